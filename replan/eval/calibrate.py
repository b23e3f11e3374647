"""Fit the velocity decay table γ of RegionE's velocity cache for any backbone and step count.

    python -m replan.eval.calibrate --backbone flux_kontext --steps 28 --dataset TainU/IV-Edit --limit 32 \\
        --output_dir outputs/calibrate/flux_kontext_28
    python -m replan.eval.calibrate --backbone tiny --steps 8 --dataset tiny --limit 2 --output_dir /tmp/cal
    python -m replan.infer ... --accel regione --accel_gamma outputs/calibrate/flux_kontext_28/gamma.json

Each sample is edited by the unaccelerated editor (its instruction as the global prompt, as RegionE's benchmarks do)
while the velocity of every step is logged: ``v_i = (x_{i+1} - x_i) / (σ_{i+1} - σ_i)``, the pipeline's own
CFG-combined velocity. The edited tokens are the ones RegionE's partition would pick at the end of the warm-up
(``--warmup``, ``--threshold``: the backbone's defaults). Per step ``i`` the edited-token ratio ``‖v_i‖/‖v_{i-1}‖``
(``--statistic norm``; ``projection``: the least-squares factor) is averaged over samples and divided by
``(1 - Δσ_i)`` (replan.accel.gamma). With random weights the table is plumbing only; with real weights it is what
the velocity cache needs at that step count.

Output directory: ``samples/<id>.json`` per finished sample (a rerun skips them: nothing finished is lost; a failed
sample is recorded in ``samples/<id>.error.txt`` and the run goes on) and ``gamma.json`` (``{"gamma": [...],
"sigmas": [...], ...}``, readable by ``--accel_gamma``). Exit codes: 0 done, 2 bad input or no usable sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import torch

from replan.accel import AccelConfig, adaptive_partition, fit_gamma, one_step_estimate, velocity_ratios
from replan.accel.gamma import STATISTICS
from replan.backbones import load_editor, resolve
from replan.inputs import check_device
from replan.io import write_outputs
from replan.plan import RegionPlan

logger = logging.getLogger("replan.eval.calibrate")


class TrajectoryRecorder:
    """Keeps ``x_0`` and the reference latent (the transformer's first input) and the latents after every step."""

    def __init__(self, transformer):
        self.first: torch.Tensor | None = None
        self.latents: list[torch.Tensor] = []
        self.handle = transformer.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if self.first is None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.first = hidden.detach().float().cpu()

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.latents.append(callback_kwargs["latents"].detach().float().cpu())
        return callback_kwargs

    def close(self) -> None:
        self.handle.remove()


def sample_ratios(editor, image, instruction: str, steps: int, seed: int, config: AccelConfig,
                  statistic: str) -> dict:
    """Edit one sample unaccelerated and return its per-step edited-token velocity ratios and the sigmas."""
    recorder = TrajectoryRecorder(editor.pipe.transformer)
    try:
        result = editor.edit(image, RegionPlan(instruction, image_size=image.size), steps=steps, seed=seed,
                             callback=recorder)
    finally:
        recorder.close()
    sigmas = [float(s) for s in editor.pipe.scheduler.sigmas]
    w, h = result.generation_size
    grid = (h // editor.patch, w // editor.patch)
    tokens = grid[0] * grid[1]
    x = [recorder.first[:, :tokens]] + recorder.latents
    reference = recorder.first[:, tokens: 2 * tokens]
    velocities = [(x[i + 1] - x[i]) / (sigmas[i + 1] - sigmas[i]) for i in range(steps)]
    j = config.warmup - 1
    edited = adaptive_partition(one_step_estimate(x[j], velocities[j], sigmas[j]), reference, grid,
                                config.threshold, config.erosion_dilation)
    ratios = velocity_ratios(velocities, edited, statistic) if edited.any() else [float("nan")] * (steps - 1)
    return {"ratios": ratios, "sigmas": sigmas, "edited_tokens": int(edited.sum()), "tokens": tokens}


def run(args) -> int:
    spec = resolve(args.backbone)
    steps = args.steps or spec.steps
    if steps < 3:  # before the phases: their message would name the warm-up, not the step count
        raise ValueError(f"calibration needs at least 3 steps (--steps), got {steps}")
    device = check_device(args.device, args.dtype)  # before anything loads, as every entry point
    config = AccelConfig.from_options("regione", warmup=args.warmup, threshold=args.threshold, post=0,
                                      refresh="none", cache_threshold=0).resolved(spec.name, spec.family, steps)
    from replan.eval.dataset import load_samples

    samples = load_samples(args.dataset, args.split, limit=args.limit)
    if not samples:
        raise ValueError(f"dataset {args.dataset!r} has no samples")
    out = Path(args.output_dir)
    folder = out / "samples"
    editor = load_editor(spec.name, args.model, device=device, torch_dtype=args.dtype)
    editor.pipe.set_progress_bar_config(disable=True)
    records, failed = {}, 0
    for sample in samples:
        path = folder / f"{sample.image_id}.json"
        if path.is_file():
            records[sample.image_id] = json.loads(path.read_text())
            continue
        try:
            record = sample_ratios(editor, sample.image, sample.instruction, steps, args.seed, config,
                                   args.statistic)
        except Exception as e:  # one bad sample never stops the run
            failed += 1
            logger.error("sample %s failed: %s", sample.image_id, e)
            text = f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
            write_outputs(folder, {f"{sample.image_id}.error.txt": lambda p, t=text: p.write_text(t)})
            continue
        write_outputs(folder, {path.name: lambda p, r=record: p.write_text(json.dumps(r) + "\n")})
        (folder / f"{sample.image_id}.error.txt").unlink(missing_ok=True)
        records[sample.image_id] = record
        print(f"{sample.image_id}: {record['edited_tokens']}/{record['tokens']} tokens edited", file=sys.stderr)
    usable = {k: r for k, r in records.items() if r["edited_tokens"] > 0 and len(r["ratios"]) == steps - 1}
    if not usable:
        raise ValueError(f"no usable sample ({len(records)} finished, {failed} failed; a sample needs edited tokens)")
    sigmas = next(iter(usable.values()))["sigmas"]
    gamma = fit_gamma([r["ratios"] for r in usable.values()], sigmas)
    table = {"gamma": list(gamma), "sigmas": sigmas, "source": f"calibrated:{spec.name}", "backbone": spec.name,
             "model": args.model or spec.model_id, "steps": steps, "statistic": args.statistic,
             "warmup": config.warmup, "threshold": config.threshold, "samples": sorted(usable),
             "dataset": args.dataset, "seed": args.seed}
    write_outputs(out, {"gamma.json": lambda p: p.write_text(json.dumps(table, indent=2) + "\n")})
    print(f"gamma from {len(usable)} sample(s) ({failed} failed) -> {out / 'gamma.json'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.eval.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="flux_kontext")
    ap.add_argument("--model", help="editor weights: hub id or local dir (default: the backbone's)")
    ap.add_argument("--steps", type=int, help="denoising steps the table is for (default: the backbone's)")
    ap.add_argument("--dataset", default="TainU/IV-Edit", help="images + instructions (IV-Edit layout; 'tiny')")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=16, help="samples to calibrate on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, help="partition at the end of this many steps (default: the backbone's)")
    ap.add_argument("--threshold", type=float, help="partition threshold tau (default: the backbone's)")
    ap.add_argument("--statistic", choices=STATISTICS, default="norm")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", help="bf16, fp16 or fp32")
    ap.add_argument("--output_dir", required=True)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
