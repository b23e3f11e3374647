"""Train the learnable-region head on image–text pairs (§8 of ``learnable-regions-spec.md``).

    python -m replan.regions.train --config configs/regions/tiny.yaml        # offline smoke run, seconds on a CPU
    python -m replan.regions.train --config configs/regions/base.yaml data.path=<hub id or dir> [key=value ...]
    accelerate launch --config_file configs/regions/accelerate_8gpu.yaml -m replan.regions.train \\
        --config configs/regions/cc12m_8gpu.yaml

Per sample: decode the image (undecodable → skipped and counted), caption (empty → skipped and counted),
``(t_o, t_ins, t_e)`` from ``Describer`` (cached JSONL), a frozen generator output ``I_gen`` for the proxy edit, then
L = α L_sa + β L_CLIP with the mask gradient of ``loss.mask_grad`` (``objective.py``, ``losses.py``).

Deviations (the paper is silent; all are config values): AdamW, constant LR after linear warm-up, gradient clipping;
L_CLIP on the proxy ``up(M) ⊙ I_gen + (1 − up(M)) ⊙ X`` (spec §6.4); ``generator.kind``:
  * ``inpaint`` — a frozen diffusers inpainting pipeline run once per sample with the whole image masked and prompt
    ``t_e`` (``generator.mask=full``, cached as PNG keyed by generator settings, sample and t_e), or with the current
    hard mask every step (``mask=current``; no cache, slow);
  * ``offline`` — NOT a generator: the source with its colour channels rotated (R→G→B→R), a deterministic
    stand-in for tests and smoke runs only.
Data (``data.py``, ``stream.py``): map-style HF datasets, or streamed webdataset shards / HF streaming datasets with
per-rank, per-worker sharding and resume by shard and offset.
Run folder: ``run_config.json`` records the settings; a run with other settings, or a fresh start over existing
checkpoints, is refused. Checkpoints (``checkpoint.py``) are atomic; ``resume: auto`` (default) continues from the
newest one and gives the same losses as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from replan.regions.config import (  # noqa: F401  (re-exported: the configuration API of a run)
    GeneratorConfig,
    LossConfig,
    TrainConfig,
    build_config,
    load_config,
    run_settings,
)

logger = logging.getLogger(__name__)
LOCAL_SKIPS = ("empty_caption", "bad_image", "bad_shard", "bad_description")


def prepare(cfg: TrainConfig, describer=None) -> dict:
    """Everything checked and built before the first step; configuration problems are one-line ``ValueError``s
    raised before any model loads (run folder, checkpoint, data source), then the models are loaded."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from replan import __version__
    from replan.config_io import check_run_settings, record_run_settings
    from replan.regions import checkpoint as ckpt
    from replan.regions.data import open_data
    from replan.regions.descriptions import Describer
    from replan.regions.losses import RunningBaseline
    from replan.regions.model import RegionGenerator, check_same_config, resolve_backbone
    from replan.regions.objective import ProxyGenerator

    out = Path(cfg.output_dir)
    if not cfg.loss.beta:
        logger.warning("loss.beta=0: the mask head gets no gradient (L_sa does not reach it); only the fusion layers "
                       "and g train")
    settings = run_settings(cfg)
    recorded = check_run_settings(out, settings, way_out="resume it with its own config, or use another output_dir")
    resume = None
    if cfg.resume == "auto":
        resume = ckpt.latest(out)
    elif cfg.resume:
        resume = Path(cfg.resume)
    elif ckpt.latest(out) is not None:
        raise ValueError(f"{out} holds checkpoints of a run ({ckpt.latest(out).name}) and resume is off: "
                         f"resume=auto continues it, or use another output_dir")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not (cfg.loss.alpha and cfg.loss.beta))
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu", kwargs_handlers=[ddp])
    trainer_state, rank_state = ckpt.load(resume, acc.process_index, acc.num_processes) if resume else ({}, {})
    with acc.main_process_first():  # offline "tiny" parts are built once, by the main process
        data = open_data(cfg.data, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)
        resolve_backbone(cfg.model.clip, "clip"), resolve_backbone(cfg.model.t5, "t5")

    torch.manual_seed(cfg.seed)
    model = RegionGenerator.from_pretrained(config=cfg.model, torch_dtype=getattr(torch, cfg.frozen_dtype))
    model.head.float()
    if resume is not None:
        check_same_config(RegionGenerator.saved_config(resume), model.cfg, resume)
        model.load_head(resume)
    model.to(acc.device)
    optim = torch.optim.AdamW([p for p in model.head.parameters() if p.requires_grad], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    head, optim = acc.prepare(model.head, optim)
    head.train()  # the only place the head trains: load and predict keep it in eval mode
    rng = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)  # Bernoulli masks
    running = RunningBaseline(cfg.loss.baseline_momentum)
    run = {"cfg": cfg, "acc": acc, "model": model, "head": head, "optim": optim, "sched": sched, "data": data,
           "rng": rng, "running": running, "out": out, "resume": resume, "step": 0, "epoch": 0, "data_state": None,
           "skipped": {k: 0 for k in (*LOCAL_SKIPS, "empty_batch")}, "history": [], "losses": []}
    if resume is not None:
        optim.load_state_dict(trainer_state["optimizer"])
        sched.load_state_dict(trainer_state["scheduler"])
        run.update(step=trainer_state["step"], epoch=rank_state["epoch"], data_state=rank_state["data"],
                   skipped={**run["skipped"], **rank_state["skipped"]})
        ckpt.set_rng_state(rank_state["rng"])
        rng.set_state(rank_state["sampler_rng"])
        running.load_state_dict(rank_state["baseline"])
        if acc.is_main_process:
            ckpt.truncate_metrics(out / "metrics.jsonl", run["step"])
        if acc.is_main_process:
            logger.info("resumed from %s at step %d", resume, run["step"])
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.clean_partial(out)
        if not recorded:
            record_run_settings(out, settings, replan_version=__version__, config=dataclasses.asdict(cfg))
    run["describer"] = describer or Describer(cfg.descriptions)
    run["generator"] = ProxyGenerator(cfg.generator, model, Path(cfg.generator.cache or out / "generated"), cfg.seed)
    return run


def _gather_sum(acc, values: list[float]) -> list[float]:
    import torch

    if acc.num_processes == 1:
        return values
    t = acc.gather(torch.tensor([values], dtype=torch.float64, device=acc.device))
    return t.sum(0).tolist()


def _texts(describer, samples, skipped_local: dict) -> tuple[list, list]:
    texts, kept = [], []
    for s, row in zip(samples, describer.many(samples)):  # a bad LLM reply skips the sample, never the epoch
        if isinstance(row, Exception):
            skipped_local["bad_description"] += 1
            if skipped_local["bad_description"] <= 3:
                logger.warning("skipping a sample: no description (%s)", str(row)[:200])
        else:
            texts.append(row)
            kept.append(s)
    return texts, kept


def step_once(run: dict, samples, texts) -> dict:
    """One optimiser step on a batch; returns the logged row."""
    import torch

    from replan.regions.objective import compute_losses

    cfg, acc, model, head, optim, sched = (run[k] for k in ("cfg", "acc", "model", "head", "optim", "sched"))
    images = [s["image"] for s in samples]
    pixels = model.preprocess(images)
    with acc.autocast():
        gen_pixels = None
        if cfg.loss.beta and (cfg.generator.kind == "offline" or cfg.generator.mask == "full"):
            gen_pixels = run["generator"](images, pixels, texts)
        elif cfg.loss.beta:  # inpaint with the current hard mask: one extra mask-only forward
            with torch.no_grad():
                hard = model(pixels, [t["t_ins"] for t in texts], head=head).mask
            gen_pixels = run["generator"](images, pixels, texts, hard)
        terms = compute_losses(model, head, cfg, pixels, texts, gen_pixels, run["rng"], run["running"])
    optim.zero_grad(set_to_none=True)
    acc.backward(terms["loss"])
    if cfg.grad_clip:
        acc.clip_grad_norm_(head.parameters(), cfg.grad_clip)
    optim.step()
    sched.step()
    run["step"] += 1
    return {"step": run["step"], "epoch": run["epoch"],
            **{k: round(float(v), 6) for k, v in terms.items() if k != "loss"},
            "objective": round(float(terms["loss"].detach()), 6), "lr": sched.get_last_lr()[0], **run["skipped"]}


def save_checkpoint(run: dict):
    from replan.regions import checkpoint as ckpt

    cfg, acc = run["cfg"], run["acc"]
    trainer_state = {"optimizer": run["optim"].state_dict(), "scheduler": run["sched"].state_dict(),
                     "step": run["step"], "world_size": acc.num_processes, "config": dataclasses.asdict(cfg)}
    rank_state = {"epoch": run["epoch"], "data": run["data_state"], "skipped": dict(run["skipped"]),
                  "rng": ckpt.rng_state(), "sampler_rng": run["rng"].get_state(),
                  "baseline": run["running"].state_dict()}
    return ckpt.save(acc, run["out"], run["step"], run["model"], trainer_state, rank_state, cfg.keep_checkpoints)


def loop(run: dict) -> dict:
    """The epochs; returns ``{"steps", "losses", "skipped", "checkpoint", "history", "cache"}``."""
    from tqdm.auto import tqdm

    cfg, acc, data = run["cfg"], run["acc"], run["data"]
    per_epoch = data.batches_per_epoch() if hasattr(data, "batches_per_epoch") else None
    total = cfg.max_steps if cfg.max_steps is not None else (per_epoch * cfg.epochs if per_epoch else None)
    bar = tqdm(total=total, initial=run["step"], disable=not (cfg.progress and acc.is_local_main_process),
               desc="regions")
    metrics, last = run["out"] / "metrics.jsonl", None
    done = total is not None and run["step"] >= total
    while not done and run["epoch"] < cfg.epochs:
        items = iter(data.items(run["epoch"], run["data_state"]))
        exhausted = False
        while True:
            item = next(items, None)
            local = dict.fromkeys(LOCAL_SKIPS, 0)
            texts, samples = [], []
            if item is not None:
                local.update({k: int(v) for k, v in item["skipped"].items()})
                texts, samples = _texts(run["describer"], item["samples"], local)
            flags = _gather_sum(acc, [float(item is None), float(len(samples) == 0),
                                      *(float(local[k]) for k in LOCAL_SKIPS)])
            if flags[0]:  # some process ran out of data: the epoch ends for all (DDP steps together)
                exhausted = True
                break
            for k, v in zip(LOCAL_SKIPS, flags[2:]):
                run["skipped"][k] += int(v)
            run["data_state"] = item["state"]
            if flags[1]:  # a process has nothing usable in this batch: everyone skips it
                run["skipped"]["empty_batch"] += 1
                continue
            row = step_once(run, samples, texts)
            run["losses"].append(row["loss_total"])
            run["history"].append(row)
            if acc.is_main_process and (run["step"] % cfg.log_every == 0 or run["step"] == 1):
                with metrics.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss_total']:.4f}", sa=f"{row['sa']:.3f}", mask=f"{row['mask_frac']:.2f}")
            if cfg.save_every and run["step"] % cfg.save_every == 0:
                last = save_checkpoint(run)
            if total is not None and run["step"] >= total:
                done = True
                break
        if exhausted:
            run["epoch"], run["data_state"] = run["epoch"] + 1, None
    bar.close()
    if last is None or not last.name.endswith(f"-{run['step']}"):
        last = save_checkpoint(run)
    if acc.is_main_process:
        _save_final(run["model"], run["out"] / "final")
    return {"steps": run["step"], "losses": run["losses"], "skipped": run["skipped"], "checkpoint": str(last),
            "history": run["history"], "cache": _cache_report(run)}


def _save_final(model, path: Path) -> None:
    import shutil

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _cache_report(run: dict) -> dict:
    d, g = run["describer"], run["generator"]
    totals = _gather_sum(run["acc"], [d.reused, d.generated, d.stale, g.reused, g.generated])
    report = {"descriptions": dict(zip(("reused", "generated", "stale"), map(int, totals[:3]))),
              "generated_images": dict(zip(("reused", "generated"), map(int, totals[3:])))}
    if not run["acc"].is_main_process:
        return report
    if sum(run["skipped"].values()):
        logger.info("skipped samples: %s", run["skipped"])
    logger.info("descriptions: %(reused)d reused from the cache, %(generated)d generated, %(stale)d cached rows "
                "from another LLM/prompt ignored", report["descriptions"])
    if run["cfg"].generator.kind == "inpaint":
        logger.info("generated images: %(reused)d reused from the cache, %(generated)d generated",
                    report["generated_images"])
    return report


def train(cfg: TrainConfig, describer=None) -> dict:
    """Run training; returns ``{"steps", "losses", "skipped", "checkpoint", "history", "cache"}``."""
    return loop(prepare(cfg, describer))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replan.regions.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/regions/tiny.yaml (offline), base.yaml, cc12m_8gpu.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value (dotted keys nest: loss.mask_grad=reinforce)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        run = prepare(cfg)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    result = loop(run)
    if run["acc"].is_main_process:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
