"""Backbone-agnostic region attention: token layout, group rules, masks, processors, the memory budget and the
token order under Ulysses context parallelism."""

from replan.attention.budget import AttentionBudgetError, AttentionCost, LayoutSize, attention_cost, parse_bytes
from replan.attention.layout import PatchGrid, TokenLayout
from replan.attention.masks import (
    GroupMembership,
    additive_mask,
    block_mask,
    class_capacity,
    dense_mask,
    materialize_block_mask,
)
from replan.attention.parallel import UlyssesLayout, UlyssesSplit, chunk_sizes, pad_text_inputs
from replan.attention.processors import (
    RegionAttention,
    RegionAttnProcessor,
    RegionCall,
    RegionProcessors,
    RegionSelfAttnProcessor,
    RegionWrapper,
    wrap_processor,
)
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
    "AttentionBudgetError", "AttentionCost", "GroupMembership", "LayoutSize", "PatchGrid", "RegionAttention",
    "RegionAttnProcessor", "RegionCall", "RegionProcessors", "RegionSelfAttnProcessor", "RegionWrapper",
    "RuleSchedule", "RuleSet", "TokenLayout", "UlyssesLayout", "UlyssesSplit", "additive_mask", "attention_cost",
    "block_mask", "canonical_name", "chunk_sizes", "class_capacity", "custom_schedule", "default_rules",
    "default_schedule", "dense_mask", "expand_to_split", "materialize_block_mask", "pad_text_inputs", "parse_bytes",
    "short_label", "switch_step", "wrap_processor",
]
