"""The editor interface shared by every backbone: execute a ``RegionPlan`` on a stock diffusers pipeline.

A family adapter (``flux_kontext.py``, …) supplies four things: the generation size for an input size, the text
token counts (tokenizer only), the prompt encoding (main prompt followed by one span per hint) and the pipeline
call. Everything else — expanding boxes, the memory check, the token layout, the rule schedule, region attention,
compilation, resizing the output back — lives here, once, for all backbones.

Region attention is installed once per editor (``RegionProcessors``): with no regions the processors call the stock
ones and the edit is the stock pipeline's, bit for bit. ``compile()`` compiles the transformer's repeated blocks
once; masks reach them as data, so later edits of the same shape reuse the compiled graphs.

This file is one idea, the edit flow around one pipeline call (memory check, layout, rule schedule, acceleration and
context-parallel checks), and stays whole though it passes 350 lines; what stands apart lives beside it
(``lora.py``, ``parallel.py``, ``registry.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from replan.accel import AccelConfig, plan_token_mask
from replan.accel.runtime import AccelRuntime
from replan.accel.session import accelerate
from replan.attention import (
    RegionAttention,
    RegionProcessors,
    RuleSchedule,
    RuleSet,
    TokenLayout,
    custom_schedule,
    default_schedule,
    wrap_processor,
)
from replan.attention.budget import LayoutSize, default_budget, fit_hint_padding, parse_bytes
from replan.backbones.lora import load_lora
from replan.backbones.parallel import check_parallel_compile, check_parallel_edit, enable_context_parallel
from replan.backbones.registry import BackboneSpec
from replan.coords import Size, box_to_patch_mask, mask_to_patch_mask
from replan.distributed import EditGroup
from replan.hub import load_error
from replan.images import check_image_size, to_rgb
from replan.plan import RegionPlan

logger = logging.getLogger(__name__)

RESIZE_BACK = Image.BICUBIC  # the official pipelines call ``image.resize((W, H))``: PIL's default, BICUBIC

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(dtype, device, default: str = "bfloat16") -> torch.dtype:
    """``None`` → the spec's dtype on an accelerator, float32 on CPU; strings like "bf16" are accepted.

    float16 on the CPU is refused (many CPU kernels lack it or overflow); bfloat16 on the CPU works, slowly.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    if dtype is None:
        return torch.float32 if on_cpu else _DTYPES[default]
    if not isinstance(dtype, torch.dtype):
        if str(dtype).lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
        dtype = _DTYPES[str(dtype).lower()]
    if dtype == torch.float16 and on_cpu:
        raise ValueError("float16 is not supported on the CPU: use fp32 (or bf16) there, fp16 on a GPU")
    return dtype


@dataclass
class TextTokens:
    """Token counts of the text side from tokenisation alone (no model runs): what the memory check needs.

    ``hint_lens`` are the spans as official (padded where the family pads); ``trimmed_hint_lens`` the spans without
    padding (None when the hints carry none). ``prepared`` holds family data the encoder reuses (token ids, …)."""

    main_len: int | None
    hint_lens: list[int]
    trimmed_hint_lens: list[int] | None = None
    prepared: dict = field(default_factory=dict)


@dataclass
class EncodedPrompt:
    """The text side of one edit: pipeline keyword arguments plus the token spans the layout needs."""

    pipeline_kwargs: dict
    main_len: int | None  # None when the main prompt was deleted
    hint_lens: list[int]
    image_prompt: tuple[int, int] | None = None


@dataclass
class EditResult:
    image: Image.Image  # the edited image at the input's size
    plan: RegionPlan
    generation_size: Size
    boxes: list  # the expanded boxes the editor used, original pixels (a mask region's own bounding box)
    layout: TokenLayout | None = None
    schedule: RuleSchedule | None = None
    attention: RegionAttention | None = None  # trace: steps → rules, mask builds, unmasked passes
    extras: dict = field(default_factory=dict)  # e.g. "hint_padding": why the hint padding was trimmed


class RegionEditor:
    """Base class. Subclasses implement ``generation_size``, ``text_tokens``, ``encode`` and ``run_pipeline``.

    ``attention_budget``: bytes the region attention of one edit may use (None: half the device's free memory at
    edit time); an edit's own ``attention_budget`` overrides it."""

    patch = 16

    def __init__(self, pipe, spec: BackboneSpec):
        self.pipe = pipe
        self.spec = spec
        self.attention_budget: int | None = None
        self._warned_eager_flex = False
        self.processors = RegionProcessors.install(pipe.transformer, self.wrap_processor)  # before enable_parallel

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | None = None, *, spec: BackboneSpec, device=None, torch_dtype=None,
                        offload: str = "none", editor_kwargs: dict | None = None, lora_path: str | None = None,
                        **load_kwargs):
        """Load ``spec.pipeline_class`` from a hub id or local directory (``model``; default ``spec.model_id``).

        ``offload``: ``"none"`` (move to ``device``), ``"model"`` (diffusers model CPU offload onto ``device``) or
        ``"sequential"`` (sequential CPU offload). ``editor_kwargs`` go to the editor's constructor. ``lora_path``:
        a LoRA for the editor in diffusers format (the official ``--lora_path``), see ``load_lora``.
        """
        import diffusers

        dtype = resolve_dtype(torch_dtype, device, spec.dtype)
        pipeline_cls = getattr(diffusers, spec.pipeline_class)
        source = model or spec.model_id
        try:
            pipe = pipeline_cls.from_pretrained(source, dtype=dtype, **load_kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(load_error(spec.pipeline_class, source, e, "--model")) from e
        if lora_path:
            load_lora(pipe, lora_path)
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        elif offload != "none":
            raise ValueError(f"offload must be 'none', 'model' or 'sequential', got {offload!r}")
        elif device is not None:
            pipe.to(device)
        return cls(pipe, spec, **(editor_kwargs or {}))

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def compiled(self) -> bool:
        """Whether the transformer's blocks were compiled by this editor or another one over the same pipeline (the
        flag lives on the transformer's one ``RegionProcessors``, so editors sharing it agree)."""
        return self.processors.compiled

    def compile(self, **compile_kwargs) -> None:
        """Compile the transformer's repeated blocks (diffusers ``compile_repeated_blocks``, inductor by default).

        The first edit of each shape (and mask kind: dense, flex, none) pays the compile; later edits of that shape —
        other steps, the rule switch, other hints or boxes with the same token count — reuse the graphs. Graphs are
        static (``dynamic=False``: one per shape, no dynamic-shape kernels) and whole (``fullgraph=True``); both can
        be overridden. Dynamo's per-function recompile limit is raised to 64 (from 8), because every compiled block
        class shares one function (``Module._call_impl``)."""
        if self.compiled:
            return
        check_parallel_compile(self)
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.pipe.transformer.compile_repeated_blocks(**{"fullgraph": True, "dynamic": False, **compile_kwargs})
        self.processors.compiled = True

    @property
    def parallel(self):
        """The diffusers ``ContextParallelConfig`` of this editor's transformer (None without parallelism)."""
        return self.processors.parallel

    @property
    def group(self) -> EditGroup:
        """The ranks computing this editor's edits together (one process without parallelism)."""
        return self.processors.group or EditGroup.single()

    def enable_parallel(self, config) -> EditGroup:
        """Compute each edit on several GPUs (diffusers context parallelism, ``ContextParallelConfig``); see
        ``replan.backbones.parallel``. Every rank then calls ``edit`` with the same arguments."""
        return enable_context_parallel(self, config)

    # ------------------------------------------------------------------------------------------------ family hooks
    def generation_size(self, image_size: Size) -> Size:
        raise NotImplementedError

    def text_tokens(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict) -> TextTokens:
        """Token counts of the main prompt and each hint, from the tokenizer alone."""
        raise NotImplementedError

    def encode(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict,
               tokens: TextTokens | None = None) -> EncodedPrompt:
        """Run the text encoder(s); ``tokens`` (from ``text_tokens``) saves tokenising twice."""
        raise NotImplementedError

    def run_pipeline(self, image: Image.Image, gen_size: Size, encoded: EncodedPrompt, options: dict,
                     callback: Callable | None) -> Image.Image:
        raise NotImplementedError

    def reference_grids(self, gen_size: Size) -> list[tuple[int, int]]:
        """Patch grids (h, w) of the reference copies in the joint sequence; default: one, same as the output."""
        return [(gen_size[1] // self.patch, gen_size[0] // self.patch)]

    def wrap_processor(self, base):
        """The region wrapper for one of this family's stock attention processors."""
        return wrap_processor(base)

    def allows_unmasked_passes(self, options: dict) -> bool:
        """Whether some transformer passes legitimately lack the hint tokens (a true-CFG negative pass)."""
        return False

    # ------------------------------------------------------------------------------------------------ editing
    def edit(
        self,
        image: Image.Image,
        plan: RegionPlan,
        *,
        steps: int | None = None,
        expand: float | None = None,
        expand_mode: str | None = None,
        switch: float | None = None,
        rules: RuleSet | RuleSchedule | Mapping | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        attention: str = "dense",
        attention_budget: int | str | None = None,
        entry: str = "cli",
        delete_main_prompt: bool = False,
        symmetric_masking: bool = False,
        bboxes_attend_to_each_other: bool = True,
        callback: Callable | None = None,
        accel: str | AccelConfig | Mapping | None = None,
        **options,
    ) -> EditResult:
        """Execute ``plan`` on ``image`` in one denoising pass.

        ``steps``/``expand``/``switch`` default to the spec's values for ``entry``. ``rules``: a ``RuleSet`` or
        ``{"Query, Key": bool}`` dict (used for every step, or before the switch step when ``switch`` is given), or a
        full ``RuleSchedule``; ``None`` gives the official default schedule. ``options`` are family options
        (e.g. ``guidance``, ``trim_hint_padding``: None = only when the padded layout is over the memory budget).
        ``attention_budget``: bytes (or "8GB") for the region attention; default the editor's. ``callback`` is a
        diffusers ``callback_on_step_end`` run after ours. ``accel``: an acceleration mode (``"regione"``,
        ``"plan"``, …) or ``AccelConfig`` (``replan.accel``); None/"none" runs the stock pipeline exactly as without it.
        """
        image = to_rgb(image)
        check_image_size(image.size)
        if plan.image_size is None:
            plan = RegionPlan(plan.global_prompt, plan.regions, plan.reasoning, image.size, plan.raw_text, plan.repairs)
        plan.check_image(image.size)  # boxes may stick out of the image: expanded, then clamped (official)
        defaults = self.spec.defaults(entry)
        steps = self.spec.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        expand = defaults.expand if expand is None else float(expand)
        expand_mode = expand_mode or self.spec.expand_mode
        accel = self.resolve_accel(accel, steps, attention)
        options = {"steps": steps, "delete_main_prompt": delete_main_prompt, **options}
        options["generator"] = generator or torch.Generator("cpu").manual_seed(int(seed))
        if delete_main_prompt and not plan.regions:  # official: without regions the flag has no effect
            logger.info("delete_main_prompt ignored: the plan has no regions (a plain global edit, as official)")
            delete_main_prompt = options["delete_main_prompt"] = False

        if attention not in ("dense", "flex"):
            raise ValueError(f"attention backend must be one of ('dense', 'flex'), got {attention!r}")
        budget = parse_bytes(attention_budget)
        ulysses = check_parallel_edit(self, bool(plan.regions), attention, accel)

        gen_size = self.generation_size(image.size)
        boxes = executed_boxes(plan, expand, expand_mode, image.size)
        for i, (x1, y1, x2, y2) in enumerate(boxes, 1):
            if x2 <= x1 or y2 <= y1:
                logger.warning("region %d box %s lies outside the image: no patch sees its hint (as official)",
                               i, list(plan.regions[i - 1].bbox))
        result = EditResult(image=image, plan=plan, generation_size=gen_size, boxes=boxes)
        if not plan.regions:  # plain global edit: the stock pipeline, nothing active
            encoded = self.encode(plan, image, gen_size, options)
            with self._accelerate(accel, plan, boxes, image.size, gen_size, options) as acc:
                out = self.run_pipeline(image, gen_size, encoded, options, _chain(acc.callback, callback))
            result.image = self._resize_back(out, image.size)
            if accel.enabled:
                result.extras["accel"] = acc.summary
            return result

        tokens = self.text_tokens(plan, image, gen_size, options)
        options["trim_hint_padding"] = self._fit_budget(plan, tokens, gen_size, options, attention, budget, result)
        if attention == "flex" and not self.compiled and not self._warned_eager_flex:
            self._warned_eager_flex = True
            logger.warning("--attention flex without --compile runs FlexAttention eagerly, which materialises the "
                           "scores: slower than dense; add --compile (compile=True)")
        encoded = self.encode(plan, image, gen_size, options, tokens)
        grid = (gen_size[1] // self.patch, gen_size[0] // self.patch)
        layout = TokenLayout.build(
            encoded.main_len, encoded.hint_lens, grid, self.reference_grids(gen_size), encoded.image_prompt, self.patch
        )
        if any(r.mask is not None for r in plan.regions):
            layout = layout.with_mask_regions(region_patch_masks(plan.masks, boxes, image.size, layout.grids))
        else:
            layout = layout.with_box_regions(boxes, image.size)
        rule_options = dict(
            delete_main_prompt=delete_main_prompt,
            bboxes_attend_to_each_other=bboxes_attend_to_each_other,
            has_image_prompt=encoded.image_prompt is not None,
            symmetric_masking=symmetric_masking,
        )
        schedule = self._schedule(rules, len(plan.regions), steps, switch, defaults.switch, rule_options)
        region = RegionAttention(layout, schedule, backend=attention, dtype=self.pipe.transformer.dtype,
                                 allow_unmasked=self.allows_unmasked_passes(options), ulysses=ulysses)
        with self.processors.activate(region), \
                self._accelerate(accel, plan, boxes, image.size, gen_size, options) as acc:
            out = self.run_pipeline(image, gen_size, encoded, options,
                                    _chain(region.callback, _chain(acc.callback, callback)))
        result.image = self._resize_back(out, image.size)
        result.layout, result.schedule, result.attention = layout, schedule, region
        if accel.enabled:
            result.extras["accel"] = acc.summary
        return result

    def _fit_budget(self, plan, tokens: TextTokens, gen_size: Size, options: dict, attention: str,
                    budget: int | None, result: EditResult) -> bool:
        """Check the plan's attention memory against the budget before any model work; returns whether the hints
        run without their padding (asked for, or the only layout that fits — then recorded in ``result.extras``)."""
        grids = [(gen_size[1] // self.patch, gen_size[0] // self.patch)] + self.reference_grids(gen_size)
        main = tokens.main_len or 0
        fixed = (1 + int(self.spec.has_image_prompt)) if main else 0  # Main (and Qwen's Image Prompt)
        padded = LayoutSize(len(plan.regions), main, sum(tokens.hint_lens), sum(h * w for h, w in grids),
                            fixed + 3 * len(plan.regions) + 2)
        trimmed = None
        if tokens.trimmed_hint_lens is not None:
            trimmed = replace(padded, hints=sum(tokens.trimmed_hint_lens))
        if budget is None:
            budget = self.attention_budget if self.attention_budget is not None else default_budget(self.device)
        transformer = self.pipe.transformer
        trim, note = fit_hint_padding(
            padded, trimmed, budget, options.get("trim_hint_padding"), backend=attention, dtype=transformer.dtype,
            heads=int(getattr(transformer.config, "num_attention_heads", 1)), compiled=self.compiled)
        if note:
            logger.warning("hint padding %s", note)
            result.extras["hint_padding"] = note
        return trim

    # ------------------------------------------------------------------------------------------------ acceleration
    def resolve_accel(self, accel, steps: int, attention: str = "dense") -> AccelConfig:
        """``accel`` (mode name, mapping or ``AccelConfig``) resolved for this backbone and step count; every
        parameter is checked here, before any model work."""
        config = AccelConfig.from_options(accel).resolved(self.spec.name, self.spec.family, steps)
        config.check_editor_options(compile=self.compiled, attention=attention)
        return config

    def accel_runtime(self) -> AccelRuntime:
        """This editor's region-acceleration runtime, installed on its transformer on first use."""
        return AccelRuntime.install(self.pipe.transformer)

    def cfg_combine(self, options: dict):
        """How the pipeline combines a step's transformer calls under true CFG (``replan.accel.controller``), or
        None when it makes one call per step."""
        return None

    def _accelerate(self, config: AccelConfig, plan: RegionPlan, boxes, image_size: Size, gen_size: Size,
                    options: dict):
        steps = options["steps"]
        grid = (gen_size[1] // self.patch, gen_size[0] // self.patch)
        mask = None
        if config.uses_plan:  # a plan without regions says nothing of where: `plan` edits the whole image,
            # `plan+regione` leaves the edited set to RegionE's partition alone
            mask = (plan_token_mask(boxes, plan.masks, image_size, grid, self.patch, config.margin) if plan.regions
                    else torch.full((grid[0] * grid[1],), config.mode == "plan", dtype=torch.bool))
        return accelerate(config, self.pipe, steps=steps, grid=grid, plan_mask=mask, runtime=self.accel_runtime,
                          combine=self.cfg_combine(options) if config.regional else None)

    @staticmethod
    def _schedule(rules, n, steps, switch, default_switch, rule_options) -> RuleSchedule:
        if isinstance(rules, RuleSchedule):
            return rules
        if isinstance(rules, Mapping):
            rules = RuleSet.from_dict(rules)
        if isinstance(rules, RuleSet):
            return custom_schedule(rules, n, steps, switch, **rule_options)
        if rules is not None:
            raise ValueError(f"rules must be a RuleSet, a RuleSchedule or a dict, got {type(rules).__name__}")
        return default_schedule(n, steps, default_switch if switch is None else switch, **rule_options)

    @staticmethod
    def _resize_back(out: Image.Image, size: Size) -> Image.Image:
        """The output at the input size, resized with PIL's default filter (BICUBIC), as official."""
        return out if out.size == tuple(size) else out.resize(tuple(size), RESIZE_BACK)


def executed_boxes(plan: RegionPlan, expand: float, expand_mode: str, image_size: Size) -> list:
    """The boxes the editor uses: expanded boxes, except for mask regions (a mask is used as drawn)."""
    return [r.bbox if r.mask is not None else b
            for r, b in zip(plan.regions, plan.expanded_boxes(expand, expand_mode, image_size))]


def region_patch_masks(masks: Sequence, boxes: Sequence, original_size: Size, grids) -> list[list[torch.Tensor]]:
    """``[grid][region]`` patch masks: a region's pixel mask where it has one, else its (expanded) box."""
    out = []
    for grid in grids:
        shape = (grid.height, grid.width)
        out.append([box_to_patch_mask(b, original_size, shape, grid.patch) if m is None
                    else mask_to_patch_mask(m, original_size, shape, grid.patch) for m, b in zip(masks, boxes)])
    return out


def _chain(first: Callable | None, second: Callable | None) -> Callable | None:
    if first is None:
        return second

    def callback(pipe, step, timestep, callback_kwargs):
        callback_kwargs = first(pipe, step, timestep, callback_kwargs)
        if second is not None:
            callback_kwargs = second(pipe, step, timestep, callback_kwargs) or callback_kwargs
        return callback_kwargs

    return callback
