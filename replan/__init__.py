"""replan: reasoning-guided region planning and training-free region attention for instruction-based image editing."""

import logging as _logging


class _SlowProcessorNotice(_logging.Filter):
    """Drop transformers' "requires torchvision; falling back to ...Pil" notices: replan chooses the PIL image
    processors on purpose (no torchvision on CPU installs), so the notice only alarms people."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision" not in str(record.msg)


_logging.getLogger("transformers.utils.import_utils").addFilter(_SlowProcessorNotice())

from replan.parse import PlanParseError, parse_plan  # noqa: E402
from replan.plan import Region, RegionPlan, draw_overlay  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PlanParseError", "Region", "RegionPlan", "draw_overlay", "parse_plan"]
