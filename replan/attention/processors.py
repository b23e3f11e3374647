"""Region attention at run time: masks as data, handed to persistent processors one transformer pass at a time.

Three parts, split by where they run:

* ``RegionAttention`` — one edit's state (layout, rule schedule, the current step, the mask cache, a trace). It is
  plain Python and never runs inside compiled code.
* ``RegionProcessors`` — installed **once per transformer**: every attention processor is wrapped, and a forward
  pre-hook on the transformer (outside any compiled block) asks the active ``RegionAttention`` for this pass's
  ``RegionCall`` and adds it to the attention kwargs as ``region=...``. With no active edit the hook adds nothing
  and every wrapper calls the stock processor: the transformer is the stock one, bit for bit.
* the wrappers (``RegionAttnProcessor``, ``RegionSelfAttnProcessor``; the Qwen editor has its own) — they only read
  the ``region`` kwarg they are given: ``None`` → the stock processor; a ``RegionCall`` → the stock math with its
  mask (the FlexAttention backend when the mask is a ``BlockMask``). No state, no counters, no step numbers, so
  ``compile_repeated_blocks`` compiles one graph per (shape, mask kind) and reuses it across steps, rule switches
  and edits.

Which passes are masked: ``callback_on_step_end`` advances the step; the hook counts transformer calls in the step.
Without true CFG every pass is masked; with true CFG the first pass of each step (the conditional one, which every
supported pipeline makes first) is masked and the later ones (the negative prompt, which has no hint tokens) run
unmasked, as official. A masked pass whose length is not the layout's raises instead of running unmasked.

Under Ulysses context parallelism (``RegionProcessors.ulysses``, set by the editor after ``enable_parallelism``)
the hook also pads the text of every pass to the split (``replan.attention.parallel``), and masks are built in the
token order each rank attends in after the all-to-all; an otherwise unmasked pass whose text was padded gets a
key-padding mask that hides the padding.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from replan.attention.layout import TokenLayout
from replan.attention.masks import GroupMembership, additive_mask, block_mask
from replan.attention.parallel import UlyssesLayout, UlyssesSplit, pad_text_inputs
from replan.attention.rules import RuleSchedule, RuleSet

BACKENDS = ("dense", "flex")


@dataclass(frozen=True, eq=False)
class RegionCall:
    """What one masked transformer pass hands to every attention processor (the ``region`` attention kwarg).

    ``mask``: the additive ``(1, 1, L, L)`` mask in the compute dtype (``kind == "dense"``, through the processor's
    own backend, SDPA by default) or a FlexAttention ``BlockMask`` (``kind == "flex"``, through diffusers' flex
    backend). Processors read it and nothing else; a compiled block guards on ``kind`` and on the mask's shape, never
    on its values. Extensions add fields here (e.g. the query rows to compute, a context-parallel layout) and read
    them in the processors — see docs/architecture.md.
    """

    mask: object
    kind: str = "dense"


class RegionAttention:
    """One edit's region-attention state.

    Args:
        layout: token layout with regions attached.
        schedule: rules per step.
        backend: ``"dense"`` (an additive mask through SDPA; CPU and GPU) or ``"flex"`` (a ``BlockMask`` through
            diffusers' FlexAttention backend; fast only when the transformer is compiled).
        block_size: FlexAttention block size.
        allow_unmasked: each step makes further transformer calls after the conditional one (a true-CFG negative
            pass); they run unmasked. Without it every call is masked.
        dtype: the compute dtype of the dense mask (the transformer's).
        ulysses: the transformer runs under Ulysses context parallelism: masks are built in the token order of a
            rank after the all-to-all, with the text padding the split needs (``cp`` records it).
    """

    def __init__(self, layout: TokenLayout, schedule: RuleSchedule, backend: str = "dense", block_size: int = 128,
                 allow_unmasked: bool = False, dtype: torch.dtype = torch.float32,
                 ulysses: UlyssesSplit | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.layout = layout
        self.membership = GroupMembership.from_layout(layout)
        self.cp: UlyssesLayout | None = None
        if ulysses is not None:
            self.cp = ulysses.layout(layout.text_len, layout.total_len - layout.text_len)
            self.membership = self.membership.arranged(self.cp.order())
        self.schedule = schedule
        self.backend = backend
        self.block_size = block_size
        self.allow_unmasked = allow_unmasked
        self.dtype = dtype
        self.step = 0
        self.passes_in_step = 0  # transformer calls started in the current step (counted by the pre-hook)
        self._current: tuple[tuple[RuleSet, str], RegionCall] | None = None
        self.builds: Counter = Counter()  # rule-set label → number of mask builds
        self.steps: dict[int, str] = {}  # step → label of the rules its masked pass used
        self.masked_passes = 0
        self.unmasked_passes = 0
        for rules in schedule.rule_sets:  # fail before any compute if a rule set strands a group
            self.membership.class_mask(rules)

    @property
    def rules(self) -> RuleSet:
        return self.schedule.at(self.step)

    def set_step(self, step: int) -> None:
        self.step = step
        self.passes_in_step = 0

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: step ``step`` is done, the next one uses the rules of ``step + 1``."""
        self.set_step(step + 1)
        return callback_kwargs

    def call(self, device: torch.device | str = "cpu") -> RegionCall:
        """The ``RegionCall`` of the current step's rules on ``device``, built once per rule set.

        Only the current rule set's mask is kept: a schedule moves forward, so the mask of a finished phase is
        dropped before the next one is built (one L² mask alive at a time on the dense path)."""
        key = (self.rules, str(device))
        if self._current is None or self._current[0] != key:
            self._current = None
            if self.backend == "dense":
                mask = additive_mask(self.membership, self.rules, self.dtype, device)
            else:
                mask = block_mask(self.membership, self.rules, device, self.block_size)
            self._current = (key, RegionCall(mask, self.backend))
            self.builds[self.rules.label] += 1
        return self._current[1]

    def release(self) -> None:
        """Drop the current mask (called when the edit ends, raised or not): the trace (``builds``, ``steps``, pass
        counts) stays readable on the edit's result, but an L² mask on the accelerator does not outlive the edit."""
        self._current = None

    def call_for_pass(self, seq_len: int, device) -> RegionCall | None:
        """The ``RegionCall`` for the next transformer pass over ``seq_len`` tokens, or None for an unmasked pass.

        Called once per transformer call by ``RegionProcessors``' pre-hook, outside compiled code."""
        self.passes_in_step += 1
        if self.allow_unmasked and self.passes_in_step > 1:
            self.unmasked_passes += 1
            return None
        if seq_len != self.layout.total_len:
            raise RuntimeError(
                f"region attention expected {self.layout.total_len} tokens (text {self.layout.text_len} + image "
                f"{self.layout.total_len - self.layout.text_len}) but the transformer attends over {seq_len}: "
                "the layout does not match this pipeline"
            )
        self.steps.setdefault(self.step, self.rules.label)
        self.masked_passes += 1
        return self.call(device)


class RegionProcessors:
    """Region-aware processors installed once on a transformer, and the pre-hook that hands each pass its mask.

    ``wrap(processor)`` makes the wrapper of one stock processor (default ``wrap_processor``, the FLUX families).
    ``with processors.activate(region): pipe(...)`` runs one edit with ``region``; outside it the transformer
    behaves as stock. ``remove()`` restores the stock processors.
    """

    def __init__(self, transformer, wrap: Callable | None = None):
        self.transformer = transformer
        params = inspect.signature(transformer.forward).parameters
        self.kwarg = "joint_attention_kwargs" if "joint_attention_kwargs" in params else "attention_kwargs"
        self.original = dict(transformer.attn_processors)
        self.compiled = False  # set by RegionEditor.compile: one flag per transformer, shared by its editors
        wrap = wrap or wrap_processor
        transformer.set_attn_processor({name: wrap(proc) for name, proc in self.original.items()})
        self.active: RegionAttention | None = None
        self.ulysses: UlyssesSplit | None = None  # set when the transformer runs under Ulysses context parallelism
        self.padded_passes = 0  # passes whose text was padded to the Ulysses split (a trace for tests and logs)
        self.parallel = None  # the diffusers ContextParallelConfig this transformer runs under (set with ``ulysses``)
        self.group = None  # the ranks that compute its passes together (``replan.distributed.EditGroup``)
        self._padding: tuple[tuple, RegionCall] | None = None
        self._hook = transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        transformer._replan_region_processors = self

    @classmethod
    def install(cls, transformer, wrap: Callable | None = None) -> RegionProcessors:
        """The transformer's region processors: installed now, or the ones already installed (a second editor over
        the same pipeline shares them instead of wrapping the wrappers)."""
        existing = getattr(transformer, "_replan_region_processors", None)
        return existing if existing is not None else cls(transformer, wrap)

    @contextmanager
    def activate(self, region: RegionAttention):
        if self.active is not None:
            raise RuntimeError("another region edit is running on this transformer")
        self.active = region
        try:
            yield region
        finally:
            self.active = None
            region.release()

    def _pre_forward(self, module, args, kwargs):
        region, split = self.active, self.ulysses
        if region is None and split is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs.get("encoder_hidden_states")
        text_len = 0 if text is None else text.shape[1]
        padding = kwargs.get("encoder_hidden_states_mask")
        padded_batch = padding is not None and not bool(padding.bool().all())
        if region is not None and padded_batch:
            raise RuntimeError("region attention does not support padded text batches (encoder_hidden_states_mask)")
        call = None if region is None else region.call_for_pass(hidden.shape[1] + text_len, hidden.device)
        if split is not None:
            if text is None:
                raise RuntimeError("context-parallel region attention needs encoder_hidden_states as a keyword")
            cp = split.layout(text_len, hidden.shape[1])
            if call is not None and cp != region.cp:
                raise RuntimeError(f"this pass splits as {cp}, but its region mask was built for {region.cp}")
            if cp.pad:
                self.padded_passes += 1
                if padded_batch:
                    raise RuntimeError("context parallelism cannot pad a padded text batch "
                                       "(encoder_hidden_states_mask)")
                kwargs = pad_text_inputs(kwargs, cp.pad)
                if call is None:
                    call = self._padding_call(cp, hidden.device)
            elif call is None:
                return None
        if call is None:
            return None
        attention_kwargs = dict(kwargs.get(self.kwarg) or {})
        attention_kwargs["region"] = call
        return args, {**kwargs, self.kwarg: attention_kwargs}

    def _padding_call(self, cp: UlyssesLayout, device) -> RegionCall:
        """The key-padding mask of an unmasked pass with padded text (kept while the arrangement repeats)."""
        key = (cp, str(device))
        if self._padding is None or self._padding[0] != key:
            self._padding = (key, RegionCall(cp.key_padding_mask(self.transformer.dtype, device)))
        return self._padding[1]

    def remove(self) -> None:
        self._hook.remove()
        self.transformer.set_attn_processor(self.original)
        self.transformer._replan_region_processors = None


def wrap_processor(base):
    """The region wrapper matching a stock FLUX-family processor's call signature."""
    params = inspect.signature(base.__call__).parameters
    if "encoder_hidden_states" in params:
        return RegionAttnProcessor(base)
    return RegionSelfAttnProcessor(base)


class RegionWrapper:
    """Holds a stock processor and a copy of it on the FlexAttention backend.

    ``_attention_backend`` and ``_parallel_config`` read and write through to the stock processor (and the copy), so
    diffusers' ``set_attention_backend`` and context parallelism still reach it."""

    def __init__(self, base):
        self.base = base
        self.flex = copy.copy(base)
        self.flex._attention_backend = "flex"

    @property
    def _attention_backend(self):
        return self.base._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.base._attention_backend = value

    @property
    def _parallel_config(self):
        return self.base._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.base._parallel_config = value
        self.flex._parallel_config = value

    def masked(self, region: RegionCall):
        return self.flex if region.kind == "flex" else self.base


class RegionAttnProcessor(RegionWrapper):
    """Wraps a stock joint-attention processor (FLUX.1 ``FluxAttnProcessor`` in double- and single-stream blocks,
    FLUX.2 ``Flux2AttnProcessor``) and hands it the mask of the ``region`` kwarg."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 region: RegionCall | None = None):
        if region is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.masked(region)(attn, hidden_states, encoder_hidden_states, region.mask, image_rotary_emb)


class RegionSelfAttnProcessor(RegionWrapper):
    """Wraps a stock processor of an already-joined sequence (FLUX.2 ``Flux2ParallelSelfAttnProcessor``)."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None,
                 region: RegionCall | None = None):
        if region is None:
            return self.base(attn, hidden_states, attention_mask, image_rotary_emb)
        return self.masked(region)(attn, hidden_states, region.mask, image_rotary_emb)
