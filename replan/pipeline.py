"""``RePlanPipeline``: plan with a VLM, then execute the plan with region attention on an MMDiT editor.

    pipe = RePlanPipeline.from_pretrained(backbone="flux", planner="local", device="cuda", stage_offload="cpu")
    out = pipe(image, "replace the cup that was used with a small cactus")
    out.image, out.plan, out.planner_text, out.overlay, out.timings

A ready plan skips the planner (``pipe(image, plan=plan)``); a pipeline built with ``planner=None`` never loads one.
``stage_offload="cpu"`` keeps only the active stage on the accelerator: the editor waits on the CPU while the
planner runs, and the planner while the editor runs. ``compile=True`` compiles the editor's transformer blocks once
(the first edit of each shape pays it); ``attention_budget`` caps the region-attention memory of an edit (default:
half the device's free memory), refusing larger plans with ``AttentionBudgetError`` before any model work.

Several GPUs per edit (``docs/parallel.md``): run the same script on every rank with ``torchrun`` and pass
``parallel=ContextParallelConfig(ulysses_degree=N)``. Each edit is then computed by a group of N ranks; the group's
leader (``pipe.is_leader``) loads the planner, plans, and sends the plan to the others; every rank returns the same
output, and only the leader should write it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from PIL import Image

from replan.attention.budget import parse_bytes
from replan.backbones import load_editor
from replan.backbones.base import EditResult, RegionEditor
from replan.backbones.lora import lora_source
from replan.backbones.registry import BackboneSpec, resolve
from replan.distributed import init_distributed
from replan.hub import check_source
from replan.images import to_rgb
from replan.inputs import check_device, check_dtype
from replan.plan import RegionPlan, draw_overlay
from replan.planner import TINY, Planner, load_planner

logger = logging.getLogger(__name__)

STAGE_OFFLOAD = ("none", "cpu")


@dataclass
class RePlanOutput:
    image: Image.Image  # the edited image, input size
    plan: RegionPlan
    planner_text: str  # raw planner reply ("" when a ready plan was given)
    overlay: Image.Image  # the input with the expanded boxes the editor used
    timings: dict = field(default_factory=dict)  # seconds: plan, edit, total
    edit: EditResult | None = None


class RePlanPipeline:
    def __init__(self, editor: RegionEditor, planner: Planner | None = None, stage_offload: str = "none",
                 device=None):
        if stage_offload not in STAGE_OFFLOAD:
            raise ValueError(f"stage_offload must be one of {STAGE_OFFLOAD}, got {stage_offload!r}")
        self.editor = editor
        self.planner = planner
        self.stage_offload = stage_offload
        self.device = device
        self.drives_followers = False  # the leader sends every call to ranks waiting in follow() (the server)
        self.on_close: list = []  # functions close() runs (e.g. waiting for follower processes)

    @property
    def group(self):
        """The ranks computing this pipeline's edits together (one process unless ``parallel`` was given)."""
        return self.editor.group

    @property
    def is_leader(self) -> bool:
        """Whether this rank plans and writes outputs (always True in one process)."""
        return self.group.leader

    @classmethod
    def from_pretrained(
        cls,
        backbone: str = "flux_kontext",
        planner: str | Planner | None = "local",
        *,
        model: str | None = None,
        vlm_ckpt_path: str | None = None,
        lora_path: str | None = None,
        vlm_lora_path: str | None = None,
        device=None,
        torch_dtype=None,
        stage_offload: str = "none",
        offload: str = "none",
        planner_kwargs: dict | None = None,
        editor_kwargs: dict | None = None,
        compile: bool = False,
        attention_budget: int | str | None = None,
        parallel=None,
    ) -> RePlanPipeline:
        """Load an editor (``backbone`` name or alias; ``model`` overrides its weights) and a planner (``"local"``,
        ``"openai"``, a ``Planner`` instance, or ``None`` for plan-only-from-file use).

        ``lora_path``: a LoRA for the editor (diffusers ``load_lora_weights``, as the official ``--lora_path``);
        ``vlm_lora_path``: a PEFT adapter merged into the local planner. ``stage_offload="cpu"``: the inactive stage
        waits on the CPU. ``offload="model" | "sequential"``: diffusers'
        model / sequential CPU offload inside the editor (lower peak memory, slower); it manages the editor's
        devices itself, so it excludes ``stage_offload``. ``compile``: compile the editor's repeated transformer
        blocks (``RegionEditor.compile``). ``attention_budget``: bytes or a size such as ``"8GB"`` for the region
        attention of one edit (None: half the device's free memory at edit time).

        ``parallel``: a diffusers ``ContextParallelConfig`` (e.g. ``ulysses_degree=2``) — call this on every rank
        of a ``torchrun`` launch; ``device`` then defaults to ``cuda:$LOCAL_RANK``. Only each group's leader loads
        the planner.
        """
        if offload != "none" and stage_offload != "none":
            raise ValueError("use either stage_offload or diffusers' offload for the editor, not both")
        if stage_offload not in STAGE_OFFLOAD:
            raise ValueError(f"stage_offload must be one of {STAGE_OFFLOAD}, got {stage_offload!r}")
        budget = parse_bytes(attention_budget)  # a bad size fails before any model loads
        if parallel is not None:
            if offload != "none" or stage_offload != "none":
                raise ValueError("context parallelism keeps the editor on each rank's GPU: drop --offload and "
                                 "--stage_offload")
            device = init_distributed(device)
        first_device = "cpu" if stage_offload == "cpu" else device
        editor = load_editor(backbone, model, device=device if offload != "none" else first_device,
                             torch_dtype=torch_dtype, offload=offload, editor_kwargs=editor_kwargs, lora_path=lora_path)
        editor.attention_budget = budget
        if parallel is not None and not editor.enable_parallel(parallel).leader:
            planner = None  # the group's leader plans and sends the plan
        if compile:  # after parallelism: the compiled blocks must see the split
            editor.compile()
        if isinstance(planner, str):
            planner = load_planner(planner, vlm_ckpt_path, lora_path=vlm_lora_path, device=first_device,
                                   torch_dtype=torch_dtype, **(planner_kwargs or {}))
        return cls(editor, planner, stage_offload, device)

    # ------------------------------------------------------------------------------------------------ stages
    def _activate(self, stage: str) -> None:
        """Move the active stage to the device and the other to the CPU (``stage_offload="cpu"`` only)."""
        if self.stage_offload != "cpu" or self.device is None:
            return
        planner_to = getattr(self.planner, "to", None)
        if stage == "plan":
            self.editor.pipe.to("cpu")
            if planner_to:
                planner_to(self.device)
        else:
            if planner_to:
                planner_to("cpu")
            self.editor.pipe.to(self.device)
        _empty_cache(self.device)

    def plan(self, image: Image.Image, instruction: str, strict: bool = False) -> tuple[RegionPlan, str]:
        """Plan on this rank, or — with several ranks per edit — on the group's leader, sent to every rank."""
        return self.group.on_leader(self._plan_here, image, instruction, strict)

    def _plan_here(self, image: Image.Image, instruction: str, strict: bool) -> tuple[RegionPlan, str]:
        if self.planner is None:
            raise ValueError("this pipeline has no planner: pass a plan, or load one with planner='local'/'openai'")
        self._activate("plan")
        plan = self.planner.plan(image, instruction, strict=strict)
        return plan, plan.raw_text

    def __call__(self, image: Image.Image, instruction: str | None = None, *, plan: RegionPlan | None = None,
                 strict_plan: bool = False, **edit_options) -> RePlanOutput:
        """Plan (unless ``plan`` is given) and edit. ``edit_options`` go to the editor's ``edit`` (steps, seed,
        guidance, expand, switch, rules, …). With several ranks per edit every rank calls this with the same
        arguments — or, with ``drives_followers``, only the leader does and the others wait in ``follow()``."""
        if self.drives_followers and self.group.distributed:
            self.group.broadcast(("call", image, instruction, plan, strict_plan, edit_options))
        return self._run(image, instruction, plan, strict_plan, edit_options)

    def follow(self) -> None:
        """On a rank other than the leader: run every call the leader makes (``drives_followers``) until
        ``close()``. A call that fails is reported by the leader; this rank goes on with the next."""
        while True:
            message = self.group.broadcast(None)
            if message is None or message[0] != "call":
                return
            _, image, instruction, plan, strict_plan, edit_options = message
            try:
                self._run(image, instruction, plan, strict_plan, edit_options)
            except Exception as e:
                logger.info("follower rank %d: the call failed as on the leader: %s: %s", self.group.rank,
                            type(e).__name__, e)

    def close(self) -> None:
        """On the leader of a ``drives_followers`` pipeline: release the ranks waiting in ``follow()``; then run
        ``on_close``."""
        if self.drives_followers and self.group.distributed and self.is_leader:
            self.group.broadcast(("stop",))
            self.drives_followers = False
        while self.on_close:
            self.on_close.pop(0)()

    def _run(self, image, instruction, plan, strict_plan, edit_options) -> RePlanOutput:
        image = to_rgb(image)
        timings = {}
        start = time.perf_counter()
        planner_text = ""
        if plan is None:
            if instruction is None:
                raise ValueError("give an instruction to plan from, or a ready plan")
            plan, planner_text = self.plan(image, instruction, strict=strict_plan)
            timings["plan"] = time.perf_counter() - start
        self._activate("edit")
        t = time.perf_counter()
        result = self.editor.edit(image, plan, **edit_options)
        timings["edit"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        overlay = draw_overlay(image, result.plan, boxes=result.boxes)
        return RePlanOutput(result.image, result.plan, planner_text, overlay, timings, result)


def check_load(backbone: str, model: str | None = None, planner: str | None = "local", vlm_ckpt_path: str | None = None,
               vlm_lora_path: str | None = None, device: str | None = None, dtype: str | None = None,
               lora_path: str | None = None) -> tuple[BackboneSpec, str]:
    """Everything ``from_pretrained`` would trip over, checked without loading: the backbone name, dtype and device,
    local weight folders (and hub models that are not cached while ``HF_HUB_OFFLINE`` is set), the editor LoRA
    (``lora_path``) and the planner's (``vlm_lora_path``). ``ValueError`` with one line naming the CLI flag
    otherwise; returns (spec, device)."""
    spec = resolve(backbone)
    check_dtype(dtype)
    device = check_device(device, dtype)
    if model:
        check_source(model, "editor", "--model", "model_index.json")
    elif not spec.builder:
        check_source(spec.model_id, "editor", "--model", "model_index.json")
    if lora_path:
        lora_source(lora_path)
        require_peft("--lora_path")
    if planner == "local":
        if vlm_ckpt_path and vlm_ckpt_path != TINY:
            check_source(vlm_ckpt_path, "planner", "--vlm_ckpt_path", "config.json")
        if vlm_lora_path:
            check_source(vlm_lora_path, "planner LoRA", "--vlm_lora_path", "adapter_config.json")
            require_peft("--vlm_lora_path")
    elif planner == "openai" and vlm_lora_path:
        raise ValueError("--vlm_lora_path applies to the local planner only; drop it with --planner openai")
    return spec, device


def require_peft(flag: str) -> None:
    """LoRA loading (diffusers' ``load_lora_weights``, peft's ``PeftModel``) needs peft: say so before loading."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag} needs the peft package, which is not installed: pip install -e '.[train]' "
                         "(or pip install peft)") from None


def no_regions_note(plan: RegionPlan) -> str | None:
    """Why a planner reply gave no regions, as one clause for people (None when it gave regions, or gave none on
    purpose: a clean reply without regions is a plain global edit). The first repair that concerns the regions is the
    reason; every entry point (CLI, app, server) words it the same way."""
    if plan.regions or not plan.repairs:
        return None
    why = next((r for r in plan.repairs if "region" in r), plan.repairs[0])
    return f"the planner reply gave no usable regions ({why})"


def _empty_cache(device) -> None:
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
