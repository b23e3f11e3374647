"""Backbone-agnostic region attention: token layout, group rules, masks and processors."""

from replan.attention.layout import PatchGrid, TokenLayout
from replan.attention.masks import GroupMembership, block_mask, dense_mask, materialize_block_mask
from replan.attention.processors import RegionAttention, RegionAttnProcessor, RegionSelfAttnProcessor, wrap_processor
from replan.attention.rules import (
    RuleSchedule,
    RuleSet,
    canonical_name,
    custom_schedule,
    default_rules,
    default_schedule,
    expand_to_split,
    short_label,
    switch_step,
)

__all__ = [
    "GroupMembership", "PatchGrid", "RegionAttention", "RegionAttnProcessor", "RegionSelfAttnProcessor",
    "RuleSchedule", "RuleSet", "TokenLayout", "block_mask", "canonical_name", "custom_schedule", "default_rules",
    "default_schedule", "dense_mask", "expand_to_split", "materialize_block_mask", "short_label", "switch_step",
    "wrap_processor",
]
