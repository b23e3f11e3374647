"""Configuration of an IV-Edit generation run: the YAML ↔ dataclass mapping, overrides, validation, the resolved
settings recorded in ``run_config.json`` and the check that refuses to mix two settings in one output folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from replan import __version__
from replan.backbones.parallel import check_accel_parallel
from replan.config_io import apply_overrides, check_keys, check_run_settings, read_yaml, recorded_settings
from replan.io import clean_staging, write_atomically
from replan.parse import parse_mode
from replan.templates import describe

logger = logging.getLogger("replan.eval.generate")

METHODS = ("replan", "baseline", "rephrase")
RESULT, ERROR, RUN_CONFIG = "result.png", "error.txt", "run_config.json"

# Our own wording for the text-only rephrase baseline (the official template file is not vendored).
REPHRASE_TEMPLATE = (Path(__file__).parent / "prompts" / "rephrase.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class PlannerConfig:
    kind: str = "local"  # local (Qwen2.5-VL through transformers) | openai (an OpenAI-compatible endpoint)
    ckpt: str | None = None  # local: hub id / dir / "tiny"; openai: the served model name; None: the RePlan planner
    base_url: str | None = None  # openai: e.g. http://localhost:8000/v1 (else $REPLAN_PLANNER_BASE_URL); key from env
    vlm_lora_path: str | None = None  # a PEFT adapter merged into the local planner
    template: str | None = None  # planner prompt template file (None: replan's wording of the official one)
    box_frame: str = "processor"  # how planner boxes are read: processor (the frame the VLM saw) | original (official)
    max_new_tokens: int | None = None  # None: the planner's default (2048; 64 for the tiny planner)
    max_retries: int = 4  # openai: retries on 5xx / timeouts


@dataclass
class GenerateConfig:
    method: str = "replan"
    backbone: str = "flux_kontext"
    model: str | None = None  # editor weights (hub id or local dir); None: the backbone's default
    lora_path: str | None = None  # a LoRA for the editor (diffusers format), as the official --lora_path
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    dataset: str = "TainU/IV-Edit"  # hub id, local copy, data file, or "tiny" (offline fixture)
    split: str = "test"
    limit: int | None = None
    output_dir: str = "outputs/eval/replan_flux_kontext"
    seed: int = 42
    steps: int | None = None  # None: the backbone's (28 Kontext, 50 Qwen, 40 Qwen-2509, 4 klein)
    guidance: float | None = None  # None: the backbone's
    expand: float | None = None  # None: the backbone's eval value (0.15)
    expand_mode: str | None = None  # None: the backbone's (ratio)
    switch: float | None = None  # None: the backbone's eval value (0.0)
    attention: str = "dense"  # dense | flex
    compile: bool = False  # compile the editor's transformer blocks once (use with attention: flex on a GPU)
    attention_budget: str | None = None  # e.g. "8GB"; None: half the device's free memory (larger plans fail)
    parse: str = "official"  # how planner replies are read: official (the paper rows) | lenient | strict
    rephrase_template: str | None = None  # rephrase: template file; None: REPHRASE_TEMPLATE
    device: str | None = None  # None: cuda (cuda:$LOCAL_RANK under torchrun) when available, else cpu
    dtype: str | None = None  # None: the backbone's on GPU, fp32 on CPU
    stage_offload: str = "none"  # none | cpu
    ulysses: int = 1  # GPUs per sample (Ulysses context parallelism); torchrun ranks form groups of this size
    ulysses_anything: bool = False  # unequal Ulysses chunks (sizes or head counts that do not divide)
    accel: str | dict | None = None  # none | regione | plan | plan+regione | cache-dit, or {mode: ..., threshold: ...}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(data: dict, source: str = "config") -> GenerateConfig:
    """Build a config from a mapping with exactly the dataclass keys (unknown keys are an error)."""
    if isinstance(data, dict) and "strict_plan" in data:
        raise ValueError(f"{source}: strict_plan is now parse: strict (parse: official | lenient | strict)")
    data = check_keys(data, GenerateConfig, source)
    planner = data.pop("planner", None) or {}
    if isinstance(planner, str):  # shorthand: "planner: tiny"
        planner = {"ckpt": planner}
    if isinstance(planner, dict) and "lora_path" in planner:
        raise ValueError(f"{source}: planner.lora_path is now planner.vlm_lora_path (the top-level lora_path is the "
                         "editor's LoRA, as the official --lora_path)")
    cfg = GenerateConfig(**data, planner=PlannerConfig(**check_keys(planner, PlannerConfig, source, "planner")))
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides=()) -> GenerateConfig:
    return config_from_dict(apply_overrides(read_yaml(path), overrides), str(path))


def validate(cfg: GenerateConfig) -> None:
    from replan.backbones.registry import resolve

    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    resolve(cfg.backbone)
    if cfg.planner.kind not in ("local", "openai"):
        raise ValueError(f"planner.kind must be local or openai, got {cfg.planner.kind!r}")
    if cfg.planner.box_frame not in ("processor", "original"):
        raise ValueError(f"planner.box_frame must be processor or original, got {cfg.planner.box_frame!r}")
    if cfg.attention not in ("dense", "flex"):
        raise ValueError(f"attention must be dense or flex, got {cfg.attention!r}")
    if not isinstance(cfg.compile, bool):
        raise ValueError(f"compile must be true or false, got {cfg.compile!r}")
    from replan.attention.budget import parse_bytes

    parse_bytes(cfg.attention_budget)
    if cfg.expand_mode not in (None, "ratio", "pixels"):
        raise ValueError(f"expand_mode must be ratio or pixels, got {cfg.expand_mode!r}")
    parse_mode(cfg.parse)
    if cfg.stage_offload not in ("none", "cpu"):
        raise ValueError(f"stage_offload must be none or cpu, got {cfg.stage_offload!r}")
    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise ValueError(f"limit must be a positive integer or null, got {cfg.limit!r}")
    if not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.steps is not None and (not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise ValueError(f"steps must be a positive integer or null, got {cfg.steps!r}")
    if not isinstance(cfg.ulysses, int) or isinstance(cfg.ulysses, bool) or cfg.ulysses < 1:
        raise ValueError(f"ulysses must be a positive integer, got {cfg.ulysses!r}")
    if cfg.ulysses_anything and cfg.ulysses == 1:
        raise ValueError("ulysses_anything needs ulysses > 1")
    check_accel_parallel(cfg.accel, cfg.ulysses)
    if cfg.ulysses > 1 and cfg.stage_offload != "none":
        raise ValueError("ulysses keeps the editor on each rank's GPU: set stage_offload: none")
    if not cfg.output_dir:
        raise ValueError("output_dir is empty")
    if cfg.lora_path:  # files named in the config are checked now, before any model loads
        from replan.backbones.lora import lora_source

        lora_source(cfg.lora_path)
    if cfg.planner.template:
        from replan.planner import load_template

        load_template(cfg.planner.template)
    accel_settings(cfg)  # the acceleration parameters against the backbone and step count, before any model loads


def accel_settings(cfg: GenerateConfig) -> dict | None:
    """The resolved acceleration settings (None without acceleration); ``ValueError`` naming a bad parameter."""
    from replan.accel import AccelConfig
    from replan.backbones.registry import resolve

    spec = resolve(cfg.backbone)
    accel = AccelConfig.from_options(cfg.accel).resolved(spec.name, spec.family, cfg.steps or spec.steps)
    accel.check_editor_options(compile=bool(cfg.compile), attention=cfg.attention)
    return accel.describe() if accel.enabled else None


# ---------------------------------------------------------------------------------------------------- helpers
def planner_parse(cfg: GenerateConfig) -> str:
    """How the planner's replies are read (``cfg.parse``: official, lenient or strict)."""
    return parse_mode(cfg.parse)


def sample_seed(seed: int, image_id: str) -> int:
    """``seed + int(image_id)`` for numeric ids, else ``seed + crc32(image_id)``: stable across runs and shards."""
    image_id = str(image_id)
    offset = int(image_id) if image_id.isdigit() else zlib.crc32(image_id.encode("utf-8"))
    return (int(seed) + offset) % (2**63)


def dist_env() -> tuple[int | None, int | None]:
    """(rank, world) from torchrun / accelerate variables, or (None, None)."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE"))
    return (int(rank) if rank is not None else None, int(world) if world is not None else None)


def default_device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local = os.environ.get("LOCAL_RANK")
    if local is not None and int(local) < torch.cuda.device_count():
        return f"cuda:{int(local)}"
    return "cuda"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read(path: str | None, default: str) -> str:
    if path is None:
        return default
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"template file {p} does not exist")
    return p.read_text(encoding="utf-8")


def resolved_settings(cfg: GenerateConfig) -> dict:
    """Everything that decides a sample's image, with defaults filled in: two runs whose settings are equal write
    the same images. Excluded: rank/world/limit/output_dir/device/stage_offload (they do not change the pixels)."""
    from replan.backbones.registry import resolve
    from replan.planner import describe_template, load_template

    spec = resolve(cfg.backbone)
    entry = spec.defaults("eval")
    settings = {
        "method": cfg.method, "backbone": spec.name, "model": cfg.model or spec.model_id,
        "dataset": cfg.dataset, "split": cfg.split, "seed": cfg.seed,
        "steps": cfg.steps or spec.steps, "guidance": cfg.guidance,
        "expand": entry.expand if cfg.expand is None else float(cfg.expand),
        "expand_mode": cfg.expand_mode or spec.expand_mode,
        "switch": entry.switch if cfg.switch is None else float(cfg.switch),
        "attention": cfg.attention, "dtype": cfg.dtype, "lora_path": cfg.lora_path,
    }
    # only when set, so run folders made before these options existed keep matching
    if cfg.compile:
        settings["compile"] = True  # compiled kernels round differently
    if cfg.attention_budget is not None:
        settings["attention_budget"] = cfg.attention_budget  # may trim hint padding
    if cfg.ulysses > 1:  # the same images up to float noise, like compile
        settings["ulysses"] = {"degree": cfg.ulysses, "anything": cfg.ulysses_anything}
    accel = accel_settings(cfg)
    if accel is not None:  # runs without acceleration keep the settings they always had
        settings["accel"] = accel
    if cfg.method == "replan":
        settings["planner"] = {"kind": cfg.planner.kind, "ckpt": cfg.planner.ckpt,
                               "vlm_lora_path": cfg.planner.vlm_lora_path, "max_new_tokens": cfg.planner.max_new_tokens,
                               "box_frame": cfg.planner.box_frame}
        template = describe_template(load_template(cfg.planner.template), cfg.planner.template)
        settings["planner"].update(template=template["name"], template_sha256=template["sha256"])
        settings["parse"] = planner_parse(cfg)
    elif cfg.method == "rephrase":
        settings["planner"] = {"kind": cfg.planner.kind, "ckpt": cfg.planner.ckpt,
                               "vlm_lora_path": cfg.planner.vlm_lora_path, "max_new_tokens": cfg.planner.max_new_tokens}
        text = _read(cfg.rephrase_template, REPHRASE_TEMPLATE)
        rephrase = describe(text, cfg.rephrase_template or "replan:eval/prompts/rephrase.txt")
        settings.update(rephrase_template=rephrase["name"], rephrase_template_sha256=rephrase["sha256"])
    return settings


def check_run_config(out: Path, cfg: GenerateConfig, settings: dict, force: bool) -> None:
    """Write ``run_config.json`` once; refuse (``ValueError``) when it records other generation settings
    (the run guard of ``replan.config_io``, shared with the trainers)."""
    way_out = "use another output_dir, or --force to regenerate every sample with the new settings"
    if check_run_settings(out, settings, force=force, way_out=way_out):
        return
    if force and recorded_settings(out) is not None:
        logger.warning("--force: %s is overwritten with the new settings", out / RUN_CONFIG)
    record = {"replan_version": __version__, "settings": settings, "config": cfg.to_dict()}
    write_atomically(out, {RUN_CONFIG: lambda p: p.write_text(json.dumps(record, indent=2) + "\n")})


def finished_ids(out: Path, samples, force: bool = False) -> set:
    """Ids of the samples already complete in ``out`` (none with ``force``); stale temporary folders removed."""
    done = set()
    for sample in samples:
        _clean_stale_tmp(out, sample.image_id)
        if not force and (out / sample.image_id / RESULT).is_file():
            done.add(sample.image_id)
    return done


def _clean_stale_tmp(out: Path, image_id: str) -> None:
    """Remove temporary folders a killed run left behind for this sample (inside its folder; older runs staged
    next to it)."""
    clean_staging(out / image_id)
    for tmp in out.glob(f".{image_id}.*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


