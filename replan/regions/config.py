"""Configuration of a learnable-regions training run (``configs/regions/*.yaml`` ↔ these dataclasses).

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides and checks everything that can be
checked without loading a model (unknown keys, enums, a data source), so a bad config is one line in the first
second. ``run_settings(cfg)`` is what a run directory records in ``run_config.json``: a run is resumed only with the
same settings (``replan.config_io.check_run_settings``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from replan.config_io import apply_overrides, check_keys, read_yaml
from replan.regions.data import DataConfig
from replan.regions.descriptions import DescriptionConfig
from replan.regions.model import RegionModelConfig

MASK_GRADS = ("ste", "reinforce")
BASELINES = ("auto", "running", "none")


@dataclass
class LossConfig:
    alpha: float = 1.0               # deviation: weights not given; all 1 as LearnRegion's code
    beta: float = 1.0
    lambda_clip: float = 1.0
    lambda_dir: float = 1.0
    lambda_struct: float = 1.0
    dir_normalize: bool = True
    struct_layer: int = -2           # deviation: CLIP tokens after all-but-last block, CLS included (LearnRegion)
    struct_reduction: str = "mean"   # mean | sum | fro
    mask_grad: str = "ste"           # ste | reinforce   (deviation, spec §6.4)
    # reinforce only: auto = leave-one-out when a process has ≥ 2 samples, else the running baseline (both unbiased)
    baseline: str = "auto"           # auto | running | none
    baseline_momentum: float = 0.9   # EMA of earlier steps' mean cost (the running baseline)


@dataclass
class GeneratorConfig:
    kind: str = "offline"            # offline (stand-in, tests only) | inpaint (frozen diffusers inpainting)
    path: str | None = None          # inpaint: pipeline id or dir
    mask: str = "full"               # inpaint: full (once per sample, cached) | current (every step)
    steps: int = 4
    guidance_scale: float = 7.5
    resolution: int = 512
    dtype: str = "float16"
    cache: str | None = None         # generated-image cache; None: <output_dir>/generated (keyed by generator+t_e)


@dataclass
class TrainConfig:
    model: RegionModelConfig = field(default_factory=RegionModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    descriptions: DescriptionConfig = field(default_factory=DescriptionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    output_dir: str = "outputs/regions"
    seed: int = 0
    batch_size: int = 32             # per process (paper: 256 over 8 GPUs)
    lr: float = 1e-4                 # deviation: optimiser/LR/schedule not given
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    mixed_precision: str = "no"      # no | fp16 | bf16
    frozen_dtype: str = "float32"    # dtype of the frozen CLIP/T5 towers
    device: str | None = None        # None: accelerate's choice; "cpu" forces CPU
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = "auto"      # auto (the newest checkpoint in output_dir, if any) | None | a step-N dir
    progress: bool = True


SECTIONS = {"model": RegionModelConfig, "data": DataConfig, "descriptions": DescriptionConfig, "loss": LossConfig,
            "generator": GeneratorConfig}
# fields that may change between a run and its resume: when to stop, how often to log/save, where
NOT_RECORDED = ("output_dir", "resume", "progress", "log_every", "save_every", "keep_checkpoints", "max_steps",
                "epochs")


def build_config(data: dict, source: str = "config") -> TrainConfig:
    data = check_keys(data, TrainConfig, source)
    kwargs = {}
    for name, value in data.items():
        if name in SECTIONS:
            kwargs[name] = SECTIONS[name](**check_keys(value or {}, SECTIONS[name], source, name))
        else:
            kwargs[name] = value
    cfg = TrainConfig(**kwargs)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Every check that needs no model, data or network: one-line ``ValueError``s naming the key and the fix."""
    if cfg.mixed_precision in (False, None):  # YAML 1.1 reads a bare ``no`` as false
        cfg.mixed_precision = "no"
    if cfg.resume in (False, "", "none", "null", "never"):
        cfg.resume = None
    if cfg.resume is True:
        cfg.resume = "auto"
    checks = [
        (cfg.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no, fp16 or bf16, not "
                                                        f"{cfg.mixed_precision!r}"),
        (cfg.loss.mask_grad in MASK_GRADS, f"loss.mask_grad must be ste or reinforce, not {cfg.loss.mask_grad!r}"),
        (cfg.loss.baseline in BASELINES, f"loss.baseline must be one of {', '.join(BASELINES)}, not "
                                         f"{cfg.loss.baseline!r}"),
        (0.0 <= cfg.loss.baseline_momentum < 1.0, f"loss.baseline_momentum must be in [0, 1), not "
                                                   f"{cfg.loss.baseline_momentum!r}"),
        (cfg.generator.kind in ("offline", "inpaint"), f"generator.kind must be offline or inpaint, not "
                                                        f"{cfg.generator.kind!r}"),
        (cfg.generator.kind != "inpaint" or bool(cfg.generator.path),
         "generator.kind=inpaint needs generator.path (an inpainting pipeline id or directory)"),
        (cfg.generator.mask in ("full", "current"), f"generator.mask must be full or current, not "
                                                     f"{cfg.generator.mask!r}"),
        (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, f"batch_size must be a positive integer, not "
                                                                   f"{cfg.batch_size!r}"),
        (cfg.max_steps is None or (isinstance(cfg.max_steps, int) and cfg.max_steps >= 0),
         f"max_steps must be a non-negative integer or null, not {cfg.max_steps!r}"),
        (isinstance(cfg.epochs, int) and cfg.epochs >= 1, f"epochs must be a positive integer, not {cfg.epochs!r}"),
        (bool(cfg.output_dir), "output_dir is empty"),
        (bool(cfg.data.path or cfg.data.webdataset),
         "no training data: set data.path (an HF image-text dataset: hub id, save_to_disk dir, or 'tiny' for the "
         "offline fixture) or data.webdataset (tar shards), e.g. data.path=tiny; configs/regions/tiny.yaml runs "
         "offline"),
        (not (cfg.data.path and cfg.data.webdataset), "set data.path or data.webdataset, not both"),
        (isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0,
         f"data.num_workers must be a non-negative integer, not {cfg.data.num_workers!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{source}: {message}")


def load_config(path, overrides=()) -> TrainConfig:
    return build_config(apply_overrides(read_yaml(path), overrides), str(path))


def run_settings(cfg: TrainConfig) -> dict:
    """The settings a run directory records: everything but when to stop and how often to log or save."""
    settings = dataclasses.asdict(cfg)
    for key in NOT_RECORDED:
        settings.pop(key, None)
    return settings
