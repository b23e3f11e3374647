"""Train the learnable-region head on image–text pairs (§8 of ``learnable-regions-spec.md``).

    python -m replan.regions.train --config configs/regions/base.yaml [key=value ...]
    accelerate launch -m replan.regions.train --config configs/regions/base.yaml mixed_precision=bf16

Per sample: decode the image (undecodable → skipped and counted), caption (empty → skipped and counted),
``(t_o, t_ins, t_e)`` from ``Describer`` (cached JSONL), a frozen generator output ``I_gen`` for the proxy edit, then
L = α L_sa + β L_CLIP with the mask gradient of ``loss.mask_grad`` (``ste`` or ``reinforce``; see ``losses.py``).

Deviations (the paper is silent; all are config values): AdamW, constant LR after linear warm-up, gradient clipping;
L_CLIP on the proxy ``up(M) ⊙ I_gen + (1 − up(M)) ⊙ X`` (spec §6.4); ``generator.kind``:
  * ``inpaint`` — a frozen diffusers inpainting pipeline run once per sample with the whole image masked and prompt
    ``t_e`` (``generator.mask=full``, cached as PNG under ``<output_dir>/generated``; the cheapest faithful option:
    one few-step generation per sample instead of one per step), or with the current hard mask every step
    (``mask=current``; no cache, slow);
  * ``offline`` — NOT a generator: the source with its colour channels rotated (R→G→B→R), a deterministic
    stand-in for tests and smoke runs only.
Data: an HF dataset (``data.path``: hub id, ``load_from_disk`` dir or a loader name with ``data.data_files``) or
webdataset tar shards (``data.webdataset``: glob/list, read with the ``datasets`` webdataset builder into a
map-style dataset; defaults to the ``jpg``/``txt`` columns when the columns are left at image/caption).
Checkpoints: ``<output_dir>/checkpoints/step-N`` (head + config + optimizer/scheduler/RNG/data position);
``resume=auto`` continues from the newest, giving the same next-step loss as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from replan.config_io import apply_overrides, check_keys, read_yaml
from replan.regions import losses as L
from replan.regions.data import DataConfig, _Batches, decode_image, epoch_batches, load_image_text  # noqa: F401
from replan.regions.descriptions import Describer, DescriptionConfig
from replan.regions.model import RegionGenerator, RegionModelConfig, check_same_config

logger = logging.getLogger(__name__)


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


@dataclass
class GeneratorConfig:
    kind: str = "offline"            # offline (stand-in, tests only) | inpaint (frozen diffusers inpainting)
    path: str | None = None          # inpaint: pipeline id or dir
    mask: str = "full"               # inpaint: full (once per sample, cached) | current (every step)
    steps: int = 4
    guidance_scale: float = 7.5
    resolution: int = 512
    dtype: str = "float16"


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
    resume: str | None = None        # None | auto | a step-N dir
    progress: bool = True


_SECTIONS = {"model": RegionModelConfig, "data": DataConfig, "descriptions": DescriptionConfig, "loss": LossConfig,
             "generator": GeneratorConfig}


def build_config(data: dict, source: str = "config") -> TrainConfig:
    data = check_keys(data, TrainConfig, source)
    kwargs = {}
    for name, value in data.items():
        if name in _SECTIONS:
            kwargs[name] = _SECTIONS[name](**check_keys(value or {}, _SECTIONS[name], source, name))
        else:
            kwargs[name] = value
    cfg = TrainConfig(**kwargs)
    if cfg.mixed_precision in (False, None):  # YAML 1.1 reads a bare ``no`` as false
        cfg.mixed_precision = "no"
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"{source}: mixed_precision must be no, fp16 or bf16, not {cfg.mixed_precision!r}")
    if cfg.loss.mask_grad not in ("ste", "reinforce"):
        raise ValueError(f"{source}: loss.mask_grad must be ste or reinforce, not {cfg.loss.mask_grad!r}")
    if cfg.generator.kind not in ("offline", "inpaint"):
        raise ValueError(f"{source}: generator.kind must be offline or inpaint, not {cfg.generator.kind!r}")
    return cfg


def load_config(path, overrides=()) -> TrainConfig:
    return build_config(apply_overrides(read_yaml(path), overrides), str(path))


# -------------------------------------------------------------------------------------------------- generator
class ProxyGenerator:
    """I_gen for the proxy edit, as CLIP-normalised pixels (B, 3, S, S), never differentiated."""

    def __init__(self, cfg: GeneratorConfig, model: RegionGenerator, cache_dir: Path):
        self.cfg, self.model, self.cache_dir, self.pipe = cfg, model, cache_dir, None

    def __call__(self, images, pixel_values, texts, hard_mask=None):
        if self.cfg.kind == "offline":  # stand-in (NOT an edit model): colour channels rotated
            unit = self.model.to_unit(pixel_values)
            return ((unit.roll(1, dims=1) - self.model.mean) / self.model.std).detach()
        outs = []
        for k, (img, t) in enumerate(zip(images, texts)):
            if self.cfg.mask == "full":
                path = self.cache_dir / f"{t['key']}.png"
                if path.is_file():
                    from PIL import Image

                    outs.append(Image.open(path).convert("RGB"))
                    continue
                out = self._inpaint(img, None, t["t_e"])
                path.parent.mkdir(parents=True, exist_ok=True)
                out.save(path)
            else:
                out = self._inpaint(img, hard_mask[k], t["t_e"])
            outs.append(out)
        return self.model.preprocess(outs).detach()

    def _inpaint(self, image, mask, prompt):
        from PIL import Image

        if self.pipe is None:
            from diffusers import AutoPipelineForInpainting

            dtype = getattr(torch, self.cfg.dtype)
            device = self.model.mean.device
            if device.type == "cpu":
                dtype = torch.float32
            self.pipe = AutoPipelineForInpainting.from_pretrained(self.cfg.path, dtype=dtype).to(device)
            self.pipe.set_progress_bar_config(disable=True)
        r = self.cfg.resolution
        if mask is None:
            mask_img = Image.new("L", (r, r), 255)
        else:
            m = (mask.detach().float().cpu().numpy() > 0.5).astype("uint8") * 255
            mask_img = Image.fromarray(m).resize((r, r), Image.NEAREST)
        with torch.no_grad():
            return self.pipe(prompt=prompt, image=image.resize((r, r)), mask_image=mask_img, height=r, width=r,
                             num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale).images[0]


# ------------------------------------------------------------------------------------------------- the step
def compute_losses(model: RegionGenerator, head, cfg: TrainConfig, pixel_values, texts, gen_pixels,
                   rng: torch.Generator | None = None) -> dict:
    """All loss terms for one batch; ``loss`` is the differentiable total (Eq. 11)."""
    lc = cfg.loss
    out = model(pixel_values, [t["t_ins"] for t in texts], with_g=True, hidden_layer=lc.struct_layer, head=head)
    with torch.no_grad():
        t_e = model.encode_text([t["t_e"] for t in texts])
        t_o = model.encode_text([t["t_o"] for t in texts])
    sa = L.semantic_alignment(out.g_fused, out.g_source, t_e, t_o)
    terms = {k: v.detach().mean() for k, v in sa.items()}
    b, n = out.probs.shape
    side = math.isqrt(n)
    if lc.beta:
        lambdas = (lc.lambda_clip, lc.lambda_dir, lc.lambda_struct)

        def clip_terms(mask):
            proxy = L.composite(model.upsample(mask.view(b, side, side)), gen_pixels, pixel_values)
            _, i_e, hidden = model.vision(proxy, lc.struct_layer)
            return L.clip_supervision(i_e, out.image_embeds, t_e, t_o, hidden.float(), out.hidden.float(), lambdas,
                                      lc.dir_normalize, lc.struct_reduction)

        if lc.mask_grad == "ste":
            cl = clip_terms(L.straight_through(out.probs, model.cfg.theta))
            clip_obj = cl["clip_total"].mean()
            mask_frac = out.mask.mean()
        else:
            sample, log_prob = L.bernoulli_mask(out.probs.float(), rng)
            with torch.no_grad():
                cl = clip_terms(sample)
            clip_obj = L.reinforce(log_prob, cl["clip_total"])
            mask_frac = sample.mean()
        terms.update({k: v.detach().mean() for k, v in cl.items()})
        loss = lc.alpha * sa["sa"].mean() + lc.beta * clip_obj
    else:
        loss = lc.alpha * sa["sa"].mean()
        mask_frac = out.mask.mean()
    terms["mask_frac"] = mask_frac.detach()
    terms["loss_total"] = lc.alpha * terms["sa"] + lc.beta * terms.get("clip_total", torch.zeros(()))
    terms["loss"] = loss
    return terms


# ------------------------------------------------------------------------------------------------ the trainer
def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [p for p in ckpts if (p / "trainer.pt").is_file()]
    return ckpts[-1] if ckpts else None


def train(cfg: TrainConfig, describer: Describer | None = None) -> dict:
    """Run training; returns ``{"steps", "losses", "skipped", "checkpoint", "history"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not (cfg.loss.alpha and cfg.loss.beta))
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu", kwargs_handlers=[ddp])
    resume = None
    if cfg.resume:
        resume = _latest_checkpoint(out_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not (resume / "trainer.pt").is_file():
            raise ValueError(f"resume={cfg.resume}: no trainer.pt there")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = RegionGenerator.from_pretrained(config=cfg.model, torch_dtype=getattr(torch, cfg.frozen_dtype))
    model.head.float()
    if resume is not None:
        saved = RegionModelConfig(**json.loads((resume / "region_config.json").read_text(encoding="utf-8")))
        check_same_config(saved, model.cfg, resume)
        model.load_head(resume)
    model.to(acc.device)
    optim = torch.optim.AdamW([p for p in model.head.parameters() if p.requires_grad], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    head, optim = acc.prepare(model.head, optim)

    ds, image_col, caption_col = load_image_text(cfg.data)
    describer = describer or Describer(cfg.descriptions)
    generator = ProxyGenerator(cfg.generator, model, out_dir / "generated")
    step, epoch, batch_idx = 0, 0, 0
    skipped = {"empty_caption": 0, "bad_image": 0, "bad_description": 0, "empty_batch": 0}
    if resume is not None:
        state = torch.load(resume / "trainer.pt", weights_only=False)
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, batch_idx, skipped = state["step"], state["epoch"], state["batch_idx"], state["skipped"]
        _set_rng_state(state["rng"])
        acc.print(f"resumed from {resume} at step {step}")
    per_epoch = len(epoch_batches(len(ds), cfg.batch_size, cfg.seed, 0, acc.process_index, acc.num_processes))
    total = cfg.max_steps or per_epoch * cfg.epochs
    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and acc.is_local_main_process), desc="regions")
    history, losses, last_ckpt = [], [], None
    metrics_path = out_dir / "metrics.jsonl"
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2), encoding="utf-8")

    def save(tag: str) -> Path:
        path = out_dir / "checkpoints" / tag
        acc.wait_for_everyone()
        if acc.is_main_process:
            model.save(path)
            torch.save({"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "step": step,
                        "epoch": epoch, "batch_idx": batch_idx, "skipped": dict(skipped), "rng": _rng_state(),
                        "config": dataclasses.asdict(cfg)}, path / "trainer.pt")
            ckpts = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            import shutil

            for old in ckpts[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        return path

    done = step >= total
    while not done and epoch < cfg.epochs:
        batches = epoch_batches(len(ds), cfg.batch_size, cfg.seed, epoch, acc.process_index, acc.num_processes)
        loader = torch.utils.data.DataLoader(_Batches(ds, image_col, caption_col, batches[batch_idx:]),
                                             batch_size=None, shuffle=False, num_workers=cfg.data.num_workers,
                                             generator=torch.Generator())  # keeps the global RNG untouched
        for samples, bad in loader:
            batch_idx += 1
            for k, v in bad.items():
                skipped[k] += int(v)
            texts, kept = [], []
            for s in samples:  # an unparsable LLM reply or a failed request skips the sample, never the epoch
                try:
                    texts.append(describer.training_texts(s["image"], s["caption"], s["bytes"]))
                    kept.append(s)
                except (ValueError, RuntimeError, OSError) as e:
                    skipped["bad_description"] += 1
                    if skipped["bad_description"] <= 3:
                        logger.warning("skipping a sample: no description (%s)", str(e)[:200])
            samples = kept
            if acc.num_processes > 1:  # every rank must step together (DDP): skip when any rank has nothing
                have = acc.gather(torch.tensor([len(samples)], device=acc.device))
                if not bool((have > 0).all()):
                    samples = []
            if not samples:
                skipped["empty_batch"] += 1
                continue
            images = [s["image"] for s in samples]
            pixels = model.preprocess(images)
            with acc.autocast():
                gen_pixels = None
                if cfg.loss.beta and (cfg.generator.kind == "offline" or cfg.generator.mask == "full"):
                    gen_pixels = generator(images, pixels, texts)
                elif cfg.loss.beta:  # inpaint with the current hard mask: one extra mask-only forward
                    with torch.no_grad():
                        hard = model(pixels, [t["t_ins"] for t in texts], head=head).mask
                    gen_pixels = generator(images, pixels, texts, hard)
                terms = compute_losses(model, head, cfg, pixels, texts, gen_pixels)
            optim.zero_grad(set_to_none=True)
            acc.backward(terms["loss"])
            if cfg.grad_clip:
                acc.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            optim.step()
            sched.step()
            step += 1
            row = {"step": step, "epoch": epoch, **{k: round(float(v), 6) for k, v in terms.items() if k != "loss"},
                   "objective": round(float(terms["loss"].detach()), 6), "lr": sched.get_last_lr()[0], **skipped}
            losses.append(float(terms["loss_total"]))
            history.append(row)
            if acc.is_main_process and (step % cfg.log_every == 0 or step == 1):
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss_total']:.4f}", sa=f"{row['sa']:.3f}", mask=f"{row['mask_frac']:.2f}")
            if cfg.save_every and step % cfg.save_every == 0:
                last_ckpt = save(f"step-{step}")
            if step >= total:
                done = True
                break
        else:
            epoch, batch_idx = epoch + 1, 0
    bar.close()
    if last_ckpt is None or not last_ckpt.name.endswith(f"-{step}"):
        last_ckpt = save(f"step-{step}")
    if acc.is_main_process:
        model.save(out_dir / "final")
    if sum(skipped.values()):
        acc.print(f"skipped samples: {skipped}")
    return {"steps": step, "losses": losses, "skipped": skipped, "checkpoint": str(last_ckpt), "history": history}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value (dotted keys nest: loss.mask_grad=reinforce)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = train(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
