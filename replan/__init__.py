"""replan: reasoning-guided region planning and training-free region attention for instruction-based image editing."""

from replan.parse import PlanParseError, parse_plan
from replan.plan import Region, RegionPlan, draw_overlay

__version__ = "0.1.0"
__all__ = ["PlanParseError", "Region", "RegionPlan", "draw_overlay", "parse_plan"]
