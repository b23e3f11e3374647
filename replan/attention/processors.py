"""Region attention at run time: per-call state, the step callback, and processors that apply the current mask.

``RegionAttention`` holds one edit's layout and rule schedule. Installed on a transformer (``with
region.installed(transformer): ...``) it wraps every attention processor so that each double- and single-stream
block attends with the mask of the current step. The mask for a rule set is built once, on first use, and cached;
``region.callback`` (a diffusers ``callback_on_step_end``) advances the step, so a rule switch changes the mask
exactly once. With true CFG, the first transformer call of each step (the conditional pass, which every supported
pipeline makes first) is masked and later calls of the step (the negative pass, which has no hint tokens) run
unmasked, as official; a masked pass whose length is not the layout's raises instead of running unmasked.

For the FLUX families the wrapped processor is the stock diffusers one, so the attention math is diffusers' own (the
Qwen editor supplies its own masked processor, since the stock one rejects masks); with no regions the editor
installs nothing and is the stock pipeline.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import torch

from replan.attention.layout import TokenLayout
from replan.attention.masks import GroupMembership, block_mask, dense_mask
from replan.attention.rules import RuleSchedule, RuleSet

BACKENDS = ("dense", "flex")


class RegionAttention:
    """One edit's region-attention state.

    Args:
        layout: token layout with regions attached.
        schedule: rules per step.
        backend: ``"dense"`` (boolean mask through SDPA; CPU and GPU) or ``"flex"`` (a ``BlockMask`` through
            diffusers' FlexAttention backend; use on GPU, ideally with the transformer compiled).
        block_size: FlexAttention block size.
        allow_unmasked: each step makes further transformer calls after the conditional one (a true-CFG negative
            pass); they run unmasked. Without it every call is masked.
    """

    def __init__(self, layout: TokenLayout, schedule: RuleSchedule, backend: str = "dense", block_size: int = 128,
                 allow_unmasked: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.layout = layout
        self.membership = GroupMembership.from_layout(layout)
        self.schedule = schedule
        self.backend = backend
        self.block_size = block_size
        self.allow_unmasked = allow_unmasked
        self.step = 0
        self.pass_in_step = 0  # transformer calls started in the current step (counted by a forward pre-hook)
        self._cache: dict[tuple[RuleSet, str], object] = {}
        self.builds: Counter = Counter()  # rule-set label → number of mask builds
        self.steps: dict[int, str] = {}  # step → label of the rules its masked passes used
        self.unmasked_calls = 0
        for rules in schedule.rule_sets:  # fail before any compute if a rule set strands a group
            self.membership.class_mask(rules)

    # ------------------------------------------------------------------------------------------------ state
    @property
    def rules(self) -> RuleSet:
        return self.schedule.at(self.step)

    def set_step(self, step: int) -> None:
        self.step = step
        self.pass_in_step = 0

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: step ``step`` is done, the next one uses the rules of ``step + 1``."""
        self.set_step(step + 1)
        return callback_kwargs

    def mask(self, device: torch.device | str = "cpu"):
        """The mask of the current step's rules on ``device``, built once per (rule set, device)."""
        rules = self.rules
        key = (rules, str(device))
        if key not in self._cache:
            if self.backend == "dense":
                self._cache[key] = dense_mask(self.membership, rules, device)
            else:
                self._cache[key] = block_mask(self.membership, rules, device, self.block_size)
            self.builds[rules.label] += 1
        return self._cache[key]

    def mask_for(self, seq_len: int, device):
        """The mask for an attention call over ``seq_len`` tokens, or None in a negative (unmasked) pass."""
        if self.allow_unmasked and self.pass_in_step > 1:
            self.unmasked_calls += 1
            return None
        if seq_len != self.layout.total_len:
            raise RuntimeError(
                f"region attention expected {self.layout.total_len} tokens (text {self.layout.text_len} + image "
                f"{self.layout.total_len - self.layout.text_len}) but the transformer attends over {seq_len}: "
                "the layout does not match this pipeline"
            )
        self.steps.setdefault(self.step, self.rules.label)
        return self.mask(device)

    # ------------------------------------------------------------------------------------------------ install
    @contextmanager
    def installed(self, transformer, wrap: Callable | None = None):
        """Wrap every attention processor of ``transformer`` for the duration of the block; restore afterwards.

        ``wrap(processor, region)`` makes the wrapper; default ``wrap_processor`` (the FLUX families)."""
        wrap = wrap or wrap_processor
        original = dict(transformer.attn_processors)
        transformer.set_attn_processor({name: wrap(proc, self) for name, proc in original.items()})
        hook = transformer.register_forward_pre_hook(self._count_pass)
        try:
            yield self
        finally:
            hook.remove()
            transformer.set_attn_processor(original)

    def _count_pass(self, module, args) -> None:
        self.pass_in_step += 1


def wrap_processor(base, region: RegionAttention):
    """The region wrapper matching a stock FLUX-family processor's call signature."""
    params = inspect.signature(base.__call__).parameters
    if "encoder_hidden_states" in params:
        return RegionAttnProcessor(base, region)
    return RegionSelfAttnProcessor(base, region)


class _RegionWrapper:
    def __init__(self, base, region: RegionAttention):
        self.base = base
        self.region = region
        self.masked = base
        if region.backend == "flex":  # same processor, FlexAttention backend (accepts a BlockMask as attn_mask)
            self.masked = copy.copy(base)
            self.masked._attention_backend = "flex"


class RegionAttnProcessor(_RegionWrapper):
    """Wraps a stock joint-attention processor (FLUX.1 ``FluxAttnProcessor`` in double- and single-stream blocks,
    FLUX.2 ``Flux2AttnProcessor``) and hands it the region mask of the current step."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        seq_len = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        mask = self.region.mask_for(seq_len, hidden_states.device)
        if mask is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.masked(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


class RegionSelfAttnProcessor(_RegionWrapper):
    """Wraps a stock processor of an already-joined sequence (FLUX.2 ``Flux2ParallelSelfAttnProcessor``)."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        mask = self.region.mask_for(hidden_states.shape[1], hidden_states.device)
        if mask is None:
            return self.base(attn, hidden_states, attention_mask, image_rotary_emb)
        return self.masked(attn, hidden_states, mask, image_rotary_emb)
