"""Region acceleration against the unaccelerated edit, side by side in one run.

    python benchmark/accel.py                           # CPU: tiny FLUX.1 Kontext through the editor, 28 steps:
                                                        #   transformer passes, image tokens, FLOPs, PSNR vs vanilla
    python benchmark/accel.py --device cuda             # GPU: FLUX.1 Kontext shapes (19 + 38 blocks, 3072 wide),
                                                        #   random bf16 weights, 1024², 28 steps: time and speed-up
    python benchmark/accel.py --device cpu --shapes small   # the GPU code path at toy sizes (a check, not a number)

CPU rows run whole tiny pipelines (random weights: the images are noise, the partition is arbitrary); the counts —
full / edited-only / skipped passes, image-stream query tokens, FLOPs (``torch.utils.flop_counter``) — are what
acceleration saves; wall times on 2 shared cores are indicative only. The GPU rows need no checkpoint: the real
transformer and VAE shapes are built with random weights, prompts are random embeddings, and the edited set is a
centred square covering a given share of the image (``plan`` mode: the share decides the cost; RegionE's own
partition on random weights would be arbitrary), plus one ``regione`` row as it partitions random weights, and
RePlan's own case: a two-region plan (512-token hints, official default rules, dense region mask) under region
attention, without and with ``plan`` acceleration (that speed-up is against the region edit without it). The GPU
run finishes in under 8 minutes on an H200. Goal (never asserted): Kontext ≥ 2.5× faster than vanilla at a 25 %
edited share; with real weights RegionE reports 2.41× at PSNR 32.1 dB against vanilla.

Reports go to ``outputs/benchmarks/accel-<device>.{json,md}``; ``--save`` writes ``benchmark/results/`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from backbones import REAL, random_weights  # noqa: E402
from common import add_output_flags, environment, timed, write_report  # noqa: E402

from replan.accel import AccelConfig, plan_token_mask  # noqa: E402
from replan.accel.runtime import AccelRuntime  # noqa: E402
from replan.accel.session import accelerate  # noqa: E402
from replan.attention import RegionAttention, RegionProcessors, TokenLayout, default_schedule  # noqa: E402
from replan.plan import RegionPlan  # noqa: E402

STEPS = 28
CPU_MODES = {
    "vanilla": None,
    "regione (tau 0, ~half edited)": {"mode": "regione", "threshold": 0.0, "erosion_dilation": False},
    "regione, velocity cache off": {"mode": "regione", "threshold": 0.0, "erosion_dilation": False,
                                    "cache_threshold": 0},
    "regione (every token edited)": {"mode": "regione", "threshold": 1.0},
    # random weights change a lot between steps: cache-dit's default residual threshold 0.08 never caches here
    "cache-dit DBCache F1B0, threshold 0.3": {"mode": "cache-dit", "cache_dit": {
        "Fn_compute_blocks": 1, "max_warmup_steps": 6, "residual_diff_threshold": 0.3}},
}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --------------------------------------------------------------------------------------------------- CPU: the editor
def bench_cpu(repeats: int) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from replan.backbones import load_editor
    from replan.testing import save_tiny_kontext

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    plan = RegionPlan("make it warm")
    rows, vanilla = [], None
    with tempfile.TemporaryDirectory() as tmp:
        editor = load_editor("flux", str(save_tiny_kontext(Path(tmp), num_layers=2, num_single_layers=4)),
                             device="cpu", editor_kwargs={"max_area": 256 * 256})
        editor.pipe.set_progress_bar_config(disable=True)
        for label, accel in CPU_MODES.items():
            if accel and accel["mode"] == "cache-dit":
                try:
                    import cache_dit  # noqa: F401
                except ImportError:
                    print(f"skip {label}: cache-dit is not installed", flush=True)
                    continue

            def run(accel=accel):
                return editor.edit(image, plan, steps=STEPS, seed=0, accel=accel, max_sequence_length=64)

            with FlopCounterMode(display=False) as counter:
                result = run()
            ms = timed(run, torch.device("cpu"), repeats)
            summary = result.extras.get("accel", {})
            row = {"mode": label, "edit_ms": round(ms, 1), "gflops": round(counter.get_total_flops() / 1e9, 3),
                   "full": summary.get("full_passes", STEPS), "edited_only": summary.get("edited_passes", 0),
                   "skipped": summary.get("skipped_passes", 0), "pattern": summary.get("pattern", "F" * STEPS),
                   "edited_share": (round(summary["edited_tokens"] / summary["tokens"], 3)
                                    if summary.get("tokens") else None),
                   "image_query_tokens": summary.get("query_tokens")}
            if vanilla is None:
                vanilla = (result.image, ms, row["gflops"])
                row["image_query_tokens"] = STEPS * 2 * (256 // 16) ** 2
            row["flops_saved"] = round(1 - row["gflops"] / vanilla[2], 3)
            row["speedup"] = round(vanilla[1] / ms, 2)
            row["psnr_vs_vanilla"] = round(psnr(result.image, vanilla[0]), 2)
            rows.append(row)
            print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- GPU: real shapes
SMALL = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6))
VAE_REAL = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                use_post_quant_conv=False)
VAE_SMALL = dict(VAE_REAL, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def shaped_pipeline(shapes: str, device, dtype):
    """A stock FluxKontextPipeline with random weights at real (or small) shapes and no text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    config = REAL["flux_kontext"]["config"] if shapes == "real" else SMALL
    transformer = random_weights(lambda: FluxTransformer2DModel(**config), device, dtype)
    vae = AutoencoderKL(**(VAE_REAL if shapes == "real" else VAE_SMALL)).to(device, dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, config


def square_mask(grid: int, share: float) -> torch.Tensor:
    side = max(1, round(grid * share**0.5))
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    lo = (grid - side) // 2
    mask[lo:lo + side, lo:lo + side] = True
    return mask.reshape(-1)


REGION_SHARE = 0.25  # the region rows: two boxes splitting a centred square of this share, 512-token hints


def region_boxes(size: int, share: float = REGION_SHARE) -> list[tuple[int, int, int, int]]:
    """Two boxes (pixels) that split a centred square covering ``share`` of a ``size``² image in halves."""
    side = round(size * share**0.5 / 32) * 32
    lo = (size - side) // 2
    return [(lo, lo, lo + side // 2, lo + side), (lo + side // 2, lo, lo + side, lo + side)]


def region_attention(size: int, dtype) -> RegionAttention:
    """Region attention as the Kontext editor runs it for a two-region plan: main prompt and two hints of 512
    tokens each (official padding), the noise grid and the reference grid, the official default schedule."""
    grid = size // 16
    layout = TokenLayout.build(512, [512, 512], (grid, grid), [(grid, grid)], None, 16)
    layout = layout.with_box_regions(region_boxes(size), (size, size))
    return RegionAttention(layout, default_schedule(2, STEPS, 0.0), backend="dense", dtype=dtype)


def bench_shapes(device, shapes: str, size: int, repeats: int, shares) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, config = shaped_pipeline(shapes, device, dtype)
    processors = RegionProcessors.install(pipe.transformer)  # region processors first, as every editor does
    runtime = AccelRuntime.install(pipe.transformer)
    g = torch.Generator(device).manual_seed(0)
    text = torch.randn(1, 3 * 512, config["joint_attention_dim"], generator=g, device=device, dtype=dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g, device=device, dtype=dtype)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    grid = size // 16

    def call(accel: AccelConfig, mask=None, regions=False):
        region = region_attention(size, dtype) if regions else None
        prompt = text if regions else text[:, :512]
        with contextlib.ExitStack() as stack:
            if region is not None:
                stack.enter_context(processors.activate(region))
            s = stack.enter_context(accelerate(accel, pipe, steps=STEPS, grid=(grid, grid), plan_mask=mask,
                                               runtime=lambda: runtime))

            def callback(p, step, timestep, kwargs):
                for fn in (region.callback if region else None, s.callback):
                    kwargs = fn(p, step, timestep, kwargs) if fn else kwargs
                return kwargs

            pipe(image=image, height=size, width=size, max_area=size * size, _auto_resize=False,
                 num_inference_steps=STEPS, guidance_scale=2.5, prompt_embeds=prompt, pooled_prompt_embeds=pooled,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent", callback_on_step_end=callback)
        return {**s.summary, "masked_passes": region.masked_passes if region else 0}

    rows = []
    cases = [("vanilla", AccelConfig(), None, False)]
    cases += [(f"plan, {int(100 * s)}% edited", AccelConfig.from_options("plan"), square_mask(grid, s), False)
              for s in shares]
    cases += [("regione (its own partition)", AccelConfig.from_options("regione"), None, False)]
    # RePlan's case: a two-region plan under region attention, without and with plan-guided acceleration
    region_mask = plan_token_mask(region_boxes(size), None, (size, size), (grid, grid), 16, 1)
    cases += [("2 regions, region attention", AccelConfig(), None, True),
              ("2 regions + plan accel", AccelConfig.from_options("plan"), region_mask, True)]
    baseline_ms = {}
    for label, accel, mask, regions in cases:
        accel = accel.resolved("flux_kontext", "flux_kontext", STEPS)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        summary = {}

        def run(accel=accel, mask=mask, regions=regions):
            summary.update(call(accel, mask, regions))

        ms = timed(run, device, repeats)
        baseline_ms.setdefault(regions, ms)  # speed-up against the same kind of edit without acceleration
        row = {"mode": label, "ms": round(ms, 1), "speedup": round(baseline_ms[regions] / ms, 2),
               "pattern": summary.get("pattern", "F" * STEPS),
               "edited_share": (round(summary["edited_tokens"] / summary["tokens"], 3)
                                if summary.get("tokens") else None),
               "kv_cache_gb": round(summary.get("kv_cache_bytes", 0) / 2**30, 2),
               "masked_passes": summary.get("masked_passes", 0),
               "bench_s": round(time.perf_counter() - start, 1)}
        if device.type == "cuda":
            row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        rows.append(row)
        print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- report
def to_markdown(report: dict) -> str:
    lines = [f"# Acceleration benchmark ({report['env']['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()] + [f"- steps: {STEPS}", ""]
    rows = report["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "–")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", choices=["real", "small"], default=None,
                    help="GPU code path: real FLUX.1 Kontext shapes (default on cuda) or toy ones (a CPU check)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024 real, 128 small)")
    ap.add_argument("--shares", default="0.1,0.25,0.5", help="edited shares of the plan rows")
    ap.add_argument("--repeats", type=int, default=2)
    add_output_flags(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes or ("real" if device.type == "cuda" else None)
    if shapes is None:
        rows = bench_cpu(args.repeats)
        name = "accel-cpu"
    else:
        size = args.size or (1024 if shapes == "real" else 128)
        rows = bench_shapes(device, shapes, size, args.repeats, [float(s) for s in args.shares.split(",")])
        name = f"accel-{device.type}" + ("" if shapes == "real" else f"-{shapes}")
    report = {"env": environment(device), "rows": rows}
    write_report(name, args, report, to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
