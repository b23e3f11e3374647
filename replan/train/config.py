"""Configuration of a GRPO run (``configs/train/stage*.yaml``): dataclasses, loading with overrides, validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from replan.config_io import apply_overrides, check_keys, read_yaml
from replan.train.data import DataConfig

REPORT_TO = ("none", "tensorboard", "wandb")
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
CONFIG_FILE = "replan_train_config.yaml"


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    path: str = DEFAULT_MODEL  # hub id, Hugging Face model directory, or "tiny" (offline random Qwen2.5-VL)
    dtype: str | None = None  # bfloat16 | float16 | float32; None: bfloat16 on GPU, float32 on CPU
    attn_implementation: str | None = None  # None: flash_attention_2 when installed on CUDA, else sdpa
    min_pixels: int | None = None  # processor resize bounds; None keeps the checkpoint's (as at inference)
    max_pixels: int | None = None
    freeze_vision_tower: bool = False  # official: false


@dataclass
class LoraSection:
    enabled: bool = False  # official: full fine-tuning
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: str | list = "all-linear"


@dataclass
class TrainConfig:
    stage: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    reward: dict = field(default_factory=dict)  # stage 2: replan.train.remote.RewardConfig (incl. ready_timeout)
    output_dir: str = "outputs/train/stage1"
    resume: str | bool | None = "auto"  # auto (last checkpoint in output_dir, if any) | never | a checkpoint dir
    report_to: str | list = "tensorboard"  # none | tensorboard | wandb (or a list)
    prompts_per_step: int = 16  # official rollout_batch_size
    max_prompt_length: int | None = 2048  # prompts longer than this (tokens, image included) are dropped
    grpo: dict = field(default_factory=dict)  # trl.GRPOConfig fields

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSection}


def config_from_dict(data: dict, source: str = "config") -> TrainConfig:
    data = check_keys(data, TrainConfig, source)
    sections = {}
    for name, cls in SECTIONS.items():
        value = data.pop(name, None) or {}
        if name == "model" and isinstance(value, str):  # shorthand: "model: tiny"
            value = {"path": value}
        sections[name] = cls(**check_keys(value, cls, source, name))
    for name in ("reward", "grpo"):
        if data.get(name) is None:
            data[name] = {}
        if not isinstance(data[name], dict):
            raise ValueError(f"{source}: {name} must be a mapping")
    cfg = TrainConfig(**data, **sections)
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides=()) -> TrainConfig:
    return config_from_dict(apply_overrides(read_yaml(path), overrides), str(path))


# When to stop, how often to log or save, where to report: may change between a run and its resume.
NOT_RECORDED = ("output_dir", "resume", "report_to")
NOT_RECORDED_GRPO = ("max_steps", "save_steps", "logging_steps", "log_completions", "save_total_limit")


def run_settings(cfg: TrainConfig) -> dict:
    """What a GRPO output folder records in ``run_config.json``: the config as given (``model.path`` before ``tiny``
    is resolved), without the fields that may change between a run and its resume."""
    settings = cfg.to_dict()
    for key in NOT_RECORDED:
        settings.pop(key, None)
    settings["grpo"] = {k: v for k, v in settings["grpo"].items() if k not in NOT_RECORDED_GRPO}
    return settings


def report_targets(value) -> list[str]:
    """``report_to`` as a checked list of trackers (``["none"]`` when empty); ``ValueError`` names a bad one."""
    items = [value] if isinstance(value, str) else list(value or ["none"])
    items = [str(v).strip().lower() for v in items if str(v).strip()] or ["none"]
    bad = [v for v in items if v not in REPORT_TO]
    if bad:
        raise ValueError(f"report_to must be one or more of {', '.join(REPORT_TO)}, got {', '.join(bad)}")
    if "none" in items and len(items) > 1:
        raise ValueError("report_to: 'none' cannot be combined with other loggers")
    return items


def validate(cfg: TrainConfig) -> None:
    if cfg.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {cfg.stage!r}")
    if not isinstance(cfg.prompts_per_step, int) or cfg.prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be a positive integer, got {cfg.prompts_per_step!r}")
    if cfg.max_prompt_length is not None and (not isinstance(cfg.max_prompt_length, int) or cfg.max_prompt_length < 1):
        raise ValueError(f"max_prompt_length must be a positive integer or null, got {cfg.max_prompt_length!r}")
    if cfg.model.dtype not in (None, "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"):
        raise ValueError(f"model.dtype must be bfloat16, float16, float32 or null, got {cfg.model.dtype!r}")
    if not cfg.output_dir:
        raise ValueError("output_dir is empty")
    if cfg.resume is True:
        cfg.resume = "auto"
    if cfg.resume in (False, None, "", "none", "null"):
        cfg.resume = "never"
    if not isinstance(cfg.resume, str):
        raise ValueError(f"resume must be auto, never or a checkpoint directory, got {cfg.resume!r}")
    report_targets(cfg.report_to)
    _check_grpo_keys(cfg.grpo)
    if cfg.stage == 2 and not cfg.reward:
        raise ValueError("stage 2 needs a reward section (edit_url, judge_url, judge_model, ...)")


# Keys we set ourselves from the sections above: not allowed in `grpo`.
OWN_KEYS = {"output_dir", "report_to", "gradient_accumulation_steps", "generation_batch_size", "steps_per_generation",
            "resume_from_checkpoint", "remove_unused_columns"}


def _check_grpo_keys(grpo: dict) -> None:
    from trl import GRPOConfig

    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(grpo) - known)
    if unknown:
        raise ValueError(f"grpo: unknown trl.GRPOConfig field(s) {', '.join(unknown)}")
    own = sorted(set(grpo) & OWN_KEYS)
    if own:
        raise ValueError(f"grpo: {', '.join(own)} are set from the top-level config (output_dir, report_to, "
                         f"prompts_per_step, resume); remove them from grpo")


