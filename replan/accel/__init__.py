"""Acceleration of the editors: RegionE (adaptive region-aware generation) and plan-guided region acceleration.

``AccelConfig`` is the one switch (``--accel`` / ``accel=``); ``Phases`` and ``StepPlan`` fix what each step runs;
``adaptive_partition`` and ``plan_token_mask`` decide the edited tokens; ``gamma`` holds the velocity decay tables
and their calibration fit; ``RegionController`` is the per-edit state machine the runtime drives from the stock
pipelines' transformer calls and step callback. See docs/acceleration.md.
"""

from replan.accel.config import MODES, REGION_MODES, AccelConfig, default_phases, parse_refresh
from replan.accel.controller import RegionController
from replan.accel.gamma import PUBLISHED_GAMMA, GammaTable, fit_gamma, load_gamma, transfer, velocity_ratios
from replan.accel.partition import (
    adaptive_partition,
    dilate_square,
    erode_cross,
    one_step_estimate,
    plan_token_mask,
    token_cosine,
    token_ids,
)
from replan.accel.phases import Phases, StepPlan

__all__ = [
    "MODES", "REGION_MODES", "AccelConfig", "default_phases", "parse_refresh", "RegionController",
    "PUBLISHED_GAMMA", "GammaTable", "fit_gamma", "load_gamma", "transfer", "velocity_ratios",
    "adaptive_partition", "dilate_square", "erode_cross", "one_step_estimate", "plan_token_mask", "token_cosine",
    "token_ids", "Phases", "StepPlan",
]
