"""Region attention on a GPU at real shapes (random weights, no checkpoint): one script, under 8 minutes.

    python benchmark/gpu_region_attention.py                          # FLUX.1 Kontext, Qwen-Image, FLUX.2 klein 4B
    python benchmark/gpu_region_attention.py --device cpu --tiny      # the same code path at toy sizes (a check)

Per backbone — Kontext (19 double + 38 single blocks, 24 x 128 heads, 1024² output + 1024² reference), Qwen-Image-Edit
(60 blocks, ~1.4k-token image prompt) and klein 4B (5 + 20 blocks) — with two regions, bf16, one transformer forward:

* eager: unmasked, dense (additive mask through SDPA);
* compiled (``compile_repeated_blocks``, as ``--compile``): compile time of the first unmasked and first flex-masked
  forward, then unmasked and flex-masked (``BlockMask``) forward time; goal masked / unmasked ≤ 1.10;
* peak memory of each, and the mask build times.

Backbones run in order while the time budget lasts (``--time-budget``, default 420 s); the rest are listed as
skipped. Writes ``outputs/benchmarks/gpu_region_attention-<device>.{json,md}`` (``--save``: ``benchmark/results/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).parent))
from common import add_output_flags, environment, once, timed, to_markdown, write  # noqa: E402

from replan.attention import (  # noqa: E402
    RegionAttention,
    RegionProcessors,
    TokenLayout,
    additive_mask,
    block_mask,
    default_schedule,
)

REAL = {
    "flux_kontext": dict(cls="FluxTransformer2DModel", config=dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), text=512, hint=512, grid=64),
    "qwenimageedit": dict(cls="QwenImageTransformer2DModel", config=dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)), text=1400, hint=12, grid=64,
        image_prompt=(0, 1300)),
    "flux_klein_4b": dict(cls="Flux2Transformer2DModel", config=dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False), text=512, hint=512, grid=64),
    "flux_klein": dict(cls="Flux2Transformer2DModel", config=dict(  # 9B: not in the default run
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
        num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False), text=512, hint=512, grid=64),
}
TINY = {  # the tiny test components' shapes: checks the code path on a CPU in seconds
    "flux_kontext": dict(REAL["flux_kontext"], config=dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        text=16, hint=16, grid=8),
    "qwenimageedit": dict(REAL["qwenimageedit"], config=dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6)), text=24, hint=6, grid=8,
        image_prompt=(0, 12)),
    "flux_klein_4b": dict(REAL["flux_klein_4b"], config=dict(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False), text=16, hint=16, grid=8),
}


def random_weights(build, device, dtype):
    """Build a model with its parameters on the meta device, then give each real random storage on ``device``.

    Buffers and plain tensor attributes (e.g. Qwen's RoPE tables) are created normally, so they keep their values.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            data = torch.empty(param.shape, device=device, dtype=dtype).normal_(0, 0.02)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return model.to(device).eval()


def random_transformer(spec: dict, device, dtype):
    import diffusers

    return random_weights(lambda: getattr(diffusers, spec["cls"])(**spec["config"]), device, dtype)


def transformer_inputs(name: str, spec: dict, n_regions: int, device, dtype):
    """Keyword inputs of one transformer forward over ``[text | noise | reference]``, and the text length."""
    cfg, grid = spec["config"], spec["grid"]
    text = spec["text"] + n_regions * spec["hint"]
    img = 2 * grid * grid
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    t = torch.tensor([0.5], device=device, dtype=dtype)
    if name == "qwenimageedit":
        return dict(hidden_states=rand(1, img, cfg["in_channels"]), encoder_hidden_states=rand(
            1, text, cfg["joint_attention_dim"]), timestep=t, img_shapes=[[(1, grid, grid), (1, grid, grid)]],
            return_dict=False), text
    kontext = name == "flux_kontext"
    ids = torch.zeros(img, 3 if kontext else 4, device=device)
    ids[:, 1] = torch.arange(grid, device=device).repeat_interleave(grid).repeat(2)
    ids[:, 2] = torch.arange(grid, device=device).repeat(2 * grid)
    ids[grid * grid:, 0] = 1 if kontext else 10
    txt_ids = torch.zeros(text, ids.shape[1], device=device)
    if not kontext:
        txt_ids[:, 3] = torch.arange(text, device=device)
    inputs = dict(hidden_states=rand(1, img, cfg["in_channels"]), encoder_hidden_states=rand(
        1, text, cfg["joint_attention_dim"]), timestep=t, img_ids=ids, txt_ids=txt_ids, return_dict=False)
    if kontext:
        inputs.update(pooled_projections=rand(1, cfg["pooled_projection_dim"]),
                      guidance=torch.tensor([2.5], device=device, dtype=dtype))
    return inputs, text


def region_layout(name: str, spec: dict, n_regions: int) -> TokenLayout:
    grid = spec["grid"]
    size = grid * 16
    boxes = [(size * i / (n_regions + 1), size * 0.2, size * (i + 1) / (n_regions + 1), size * 0.8)
             for i in range(n_regions)]
    layout = TokenLayout.build(spec["text"], [spec["hint"]] * n_regions, (grid, grid), [(grid, grid)],
                               image_prompt=spec.get("image_prompt"))
    return layout.with_box_regions(boxes, (size, size))


def peak(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure(fn, device, repeats: int) -> tuple[float, float | None]:
    """(median ms, peak GiB) of ``fn`` after one warm-up call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed(fn, device, repeats)
    return round(ms, 1), peak(device)


def bench_backbone(name, spec, device, dtype, n_regions, repeats, compile_kwargs) -> dict:
    wrap = None
    if name == "qwenimageedit":
        from replan.backbones.qwen_image_edit import RegionQwenAttnProcessor as wrap
    t0 = time.perf_counter()
    model = random_transformer(spec, device, dtype)
    processors = RegionProcessors(model, wrap)
    inputs, _ = transformer_inputs(name, spec, n_regions, device, dtype)
    layout = region_layout(name, spec, n_regions)
    schedule = default_schedule(n_regions, 1, 0.0, has_image_prompt=spec.get("image_prompt") is not None)
    row = {"backbone": name, "tokens": layout.total_len, "regions": n_regions, "heads":
           spec["config"]["num_attention_heads"], "build_s": round(time.perf_counter() - t0, 1)}
    dense = RegionAttention(layout, schedule, backend="dense", dtype=dtype)
    flex = RegionAttention(layout, schedule, backend="flex", dtype=dtype)
    rules = schedule.at(0)
    row["dense_mask_build_ms"] = round(timed(lambda: additive_mask(dense.membership, rules, dtype, device), device,
                                             repeats), 1)
    row["block_mask_build_ms"] = round(timed(lambda: block_mask(flex.membership, rules, device), device, repeats), 1)

    def run(region=None):
        with torch.no_grad():
            if region is None:
                return model(**inputs)
            with processors.activate(region):
                return model(**inputs)

    row["eager_unmasked_ms"], row["eager_unmasked_peak_gb"] = measure(run, device, repeats)
    row["eager_dense_ms"], row["eager_dense_peak_gb"] = measure(lambda: run(dense), device, repeats)
    row["eager_dense_over_unmasked"] = round(row["eager_dense_ms"] / row["eager_unmasked_ms"], 3)
    reference = run(dense)[0].float()

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.compile_repeated_blocks(**{"fullgraph": True, "dynamic": False, **compile_kwargs})
    row["compile_unmasked_s"] = round(once(run, device), 1)
    row["compile_flex_s"] = round(once(lambda: run(flex), device), 1)
    row["compiled_unmasked_ms"], row["compiled_unmasked_peak_gb"] = measure(run, device, repeats)
    row["compiled_flex_ms"], row["compiled_flex_peak_gb"] = measure(lambda: run(flex), device, repeats)
    row["flex_over_unmasked"] = round(row["compiled_flex_ms"] / row["compiled_unmasked_ms"], 3)
    row["flex_over_eager_dense"] = round(row["compiled_flex_ms"] / row["eager_dense_ms"], 3)
    row["flex_vs_dense_max_abs_diff"] = round(float((run(flex)[0].float() - reference).abs().max()), 4)
    row["total_s"] = round(time.perf_counter() - t0, 1)
    processors.remove()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbones", nargs="+", default=["flux_kontext", "qwenimageedit", "flux_klein_4b"],
                    choices=sorted(REAL))
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; later backbones are skipped")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (checks the code path, e.g. on a CPU)")
    ap.add_argument("--compile-backend", default="inductor")
    add_output_flags(ap)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to check the script")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = TINY if args.tiny else REAL
    start, rows, skipped = time.perf_counter(), [], []
    for name in args.backbones:
        if name not in specs:
            skipped.append(f"{name}: no tiny shapes")
            continue
        if time.perf_counter() - start > args.time_budget:
            skipped.append(f"{name}: time budget of {args.time_budget:.0f} s spent")
            continue
        row = bench_backbone(name, specs[name], device, dtype, args.regions, args.repeats,
                             {"backend": args.compile_backend})
        rows.append(row)
        print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"env": environment(device), "tiny": args.tiny, "rows": rows, "skipped": skipped,
              "seconds": round(time.perf_counter() - start, 1)}
    notes = [f"{'TOY SHAPES (a code-path check, not a measurement). ' if args.tiny else ''}Random weights, "
             f"{str(dtype).split('.')[-1]}, one transformer forward, {args.regions} regions; total "
             f"{report['seconds']} s." + (f" Skipped: {'; '.join(skipped)}." if skipped else "")]
    write("gpu_region_attention", device, report, to_markdown("Region attention at real shapes", report,
                                                              {"Forward": rows}, notes), args.save, args.out)


if __name__ == "__main__":
    main()
