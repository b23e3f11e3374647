"""Configuration of a learnable-regions training run (``configs/regions/*.yaml`` ↔ these dataclasses).

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides and checks everything that can be
checked without loading a model (unknown keys, enums, a data source), so a bad config is one line in the first
second (this module imports no torch). ``run_settings(cfg)`` is what a run directory records in
``run_config.json``: a run is resumed only with the same settings (``replan.config_io.check_run_settings``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from replan.config_io import apply_overrides, check_keys, read_yaml
from replan.regions.descriptions import DescriptionConfig

TINY_DATA = "tiny"  # data.path of the offline fixture: coloured shapes with captions (replan.testing.regions)
MASK_GRADS = ("ste", "reinforce")
BASELINES = ("auto", "running", "none")


@dataclass
class RegionModelConfig:
    """Sizes and choices of the trainable head. Paper-silent choices ([gap] in the spec) are marked *deviation*."""

    clip: str = "openai/clip-vit-large-patch14"  # vision + text towers (one CLIPModel checkpoint or dir)
    t5: str = "google/flan-t5-base"              # encoder only
    image_size: int = 224                        # deviation: input size not stated; ViT-L/14 → 16×16 patches
    # deviation: ViT-L/14 tokens are 1024-wide; "clip" applies post-LN + the visual projection to every patch
    # (dense-CLIP trick, gives d = 768 as the paper says); "linear" learns a width→d map; "none" keeps the raw width
    patch_proj: str = "clip"
    heads: int = 12                              # deviation: 12 × 64 for d = 768
    cross_layers: int = 1                        # deviation: one pre-LN residual layer each
    self_layers: int = 1
    mlp_hidden: int = 256                        # deviation: MLP d→256→1, GELU
    dropout: float = 0.0
    theta: float = 0.5                           # deviation: threshold not given
    upsample: str = "nearest"                    # deviation: nearest | bilinear (then re-thresholded at 0.5)
    g_pool: str = "attn"                         # deviation: g = attn pooling (learned query) | mean; + 2-layer MLP
    g_hidden: int = 1024
    max_ins_tokens: int = 77
    max_text_tokens: int = 77


@dataclass
class DataConfig:
    path: str | None = None          # HF dataset id / save_to_disk dir / loader name (with data_files) / tiny
    data_files: str | list | dict | None = None
    split: str = "train"
    streaming: bool = False          # read data.path as an HF streaming dataset (shard by shard), never in memory
    webdataset: str | list | None = None  # tar shards (always streamed): glob, {000..099} range, list; local or URL
    shuffle_shards: bool = True      # streaming: a seeded shard order per epoch (rows keep their order in a shard)
    image_column: str = "image"      # the default picks jpg/jpeg/png/webp when there is no "image" column
    caption_column: str = "caption"  # the default picks txt/text when there is no "caption" column
    max_samples: int | None = None   # map-style: the first N rows; streaming: ≈ N rows per epoch (split over readers)
    num_workers: int = 0             # DataLoader workers decoding images (streaming: each reads its own shards)


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
