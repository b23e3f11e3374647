"""Region-attention cost per backbone: region edit vs stock edit, and masked vs unmasked transformer forwards.

    python benchmark/backbones.py                   # CPU: whole tiny pipelines, region edit / stock edit time
    python benchmark/backbones.py --device cuda     # GPU: real transformer shapes with random weights (bf16):
                                                    #   forward time and peak memory, masked vs unmasked

CPU numbers compare the full edit path (encoding, layout, masks, every transformer call) on tiny random components;
they show the overhead replan adds, not real speed. On a GPU the real block counts and widths are built with random
weights (no checkpoint needed). Results go to ``outputs/benchmarks/backbones-<device>.{json,md}`` (``--save``:
``benchmark/results/``) with machine, versions and date. Goals to report (never asserted): masked/unmasked ≤ 1.10×;
klein-4B editing next to a 7B-shaped planner with stage offload peaks at ≤ 16 GB (``--stage-offload-peak``:
Qwen2.5-VL-7B-shaped planner forward on the GPU, planner moved to the CPU, then klein-4B-shaped text encoder +
transformer run a 2-region edit step at 1024²).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from attention_masks import environment, timed  # noqa: E402
from bench_io import add_output_flags, write_report  # noqa: E402

from replan.attention import RegionAttention, TokenLayout, default_schedule  # noqa: E402
from replan.backbones import load_editor  # noqa: E402
from replan.plan import Region, RegionPlan  # noqa: E402

PLAN = RegionPlan("make it warm", (Region((10, 10, 90, 80), "a red cat"), Region((120, 60, 230, 170), "a dog")))


# --------------------------------------------------------------------------------------------------- CPU: pipelines
def tiny_editors(root: Path):
    from replan.testing import save_tiny_kontext
    from replan.testing.klein import TINY_KLEIN_EDITOR_KWARGS, save_tiny_klein
    from replan.testing.qwen_image import save_tiny_qwen_edit

    yield "flux_kontext", load_editor("flux", str(save_tiny_kontext(root / "k")), device="cpu",
                                      editor_kwargs={"max_area": 256 * 256}), {"max_sequence_length": 64}
    yield "qwenimageedit", load_editor("qwen", str(save_tiny_qwen_edit(root / "q")), device="cpu"), {}
    yield "qwenimageedit2511", load_editor("qwen2511", str(save_tiny_qwen_edit(root / "q2", plus=True,
                                                                                zero_cond_t=True)), device="cpu"), {}
    klein_kwargs = {**TINY_KLEIN_EDITOR_KWARGS, "max_area": 256 * 256}
    yield "flux_klein", load_editor("klein", str(save_tiny_klein(root / "kl", distilled=True)), device="cpu",
                                    editor_kwargs=klein_kwargs), {}
    yield "flux_klein_base", load_editor("flux_klein_base", str(save_tiny_klein(root / "kb")), device="cpu",
                                         editor_kwargs=klein_kwargs), {}


def bench_cpu(repeats: int) -> list[dict]:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions
    edit.calculate_dimensions = lambda area, ratio: original(256 * 256, ratio)
    plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE = 256 * 256, 128 * 128
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, editor, options in tiny_editors(Path(tmp)):
            editor.pipe.set_progress_bar_config(disable=True)
            cpu = torch.device("cpu")
            stock = timed(lambda: editor.edit(image, RegionPlan(PLAN.global_prompt), steps=4, **options), cpu, repeats)
            region = timed(lambda: editor.edit(image, PLAN, steps=4, **options), cpu, repeats)
            row = {"backbone": name, "stock_edit_ms": round(stock, 1), "region_edit_ms": round(region, 1),
                   "region_over_stock": round(region / stock, 3)}
            rows.append(row)
            print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- GPU: real shapes
REAL = {
    "flux_kontext": dict(cls="FluxTransformer2DModel", config=dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), text=512, hint=512),
    "qwenimageedit": dict(cls="QwenImageTransformer2DModel", config=dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)), text=1400, hint=12),
    "flux_klein_4b": dict(cls="Flux2Transformer2DModel", config=dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False), text=512, hint=512),
    "flux_klein": dict(cls="Flux2Transformer2DModel", config=dict(
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
        num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False), text=512, hint=512),
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


def transformer_inputs(name: str, spec: dict, grid: int, n_regions: int, device, dtype):
    cfg = spec["config"]
    text = spec["text"] + n_regions * spec["hint"]
    img = 2 * grid * grid
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    if name == "qwenimageedit":
        return dict(hidden_states=rand(1, img, cfg["in_channels"]), encoder_hidden_states=rand(1, text, 3584),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype),
                    img_shapes=[[(1, grid, grid), (1, grid, grid)]], return_dict=False), text
    ids = torch.zeros(img, 3 if name == "flux_kontext" else 4, device=device)
    rows = torch.arange(grid, device=device).repeat_interleave(grid).repeat(2)
    cols = torch.arange(grid, device=device).repeat(2 * grid)
    ids[:, 1], ids[:, 2] = rows, cols
    ids[grid * grid:, 0] = 1 if name == "flux_kontext" else 10
    txt_ids = torch.zeros(text, ids.shape[1], device=device)
    if name != "flux_kontext":
        txt_ids[:, 3] = torch.arange(text, device=device)
    inputs = dict(hidden_states=rand(1, img, cfg["in_channels"]), encoder_hidden_states=rand(1, text,
                  cfg["joint_attention_dim"]), timestep=torch.tensor([0.5], device=device, dtype=dtype),
                  img_ids=ids, txt_ids=txt_ids, return_dict=False)
    if name == "flux_kontext":
        inputs.update(pooled_projections=rand(1, 768), guidance=torch.tensor([2.5], device=device, dtype=dtype))
    return inputs, text


def bench_gpu(device, repeats: int, grid: int, n_regions: int, backends: list[str]) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for name, spec in REAL.items():
        model = random_transformer(spec, device, dtype)
        inputs, text = transformer_inputs(name, spec, grid, n_regions, device, dtype)
        main = text - n_regions * spec["hint"]
        size = grid * 16
        boxes = [(size * i / (n_regions + 1), size * 0.2, size * (i + 1) / (n_regions + 1), size * 0.8)
                 for i in range(n_regions)]
        layout = TokenLayout.build(main, [spec["hint"]] * n_regions, (grid, grid), [(grid, grid)],
                                   image_prompt=(0, 1300) if name == "qwenimageedit" else None)
        layout = layout.with_box_regions(boxes, (size, size))
        schedule = default_schedule(n_regions, 1, 0.0, has_image_prompt=name == "qwenimageedit")
        wrap = None
        if name == "qwenimageedit":
            from replan.backbones.qwen_image_edit import RegionQwenAttnProcessor as wrap
        row = {"backbone": name, "tokens": layout.total_len, "regions": n_regions}
        with torch.no_grad():
            row["unmasked_ms"] = round(timed(lambda: model(**inputs), device, repeats), 1)
            for backend in backends:
                region = RegionAttention(layout, schedule, backend=backend)
                with region.installed(model, wrap):
                    row[f"{backend}_masked_ms"] = round(timed(lambda: model(**inputs), device, repeats), 1)
                row[f"{backend}_over_unmasked"] = round(row[f"{backend}_masked_ms"] / row["unmasked_ms"], 3)
        row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        print(row, flush=True)
        model = None  # free the GPU memory before the next backbone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return rows


def bench_stage_offload_peak(device, grid: int = 64) -> dict:
    """Peak GPU memory of plan-then-edit with stage offload: a 7B-shaped planner, then klein-4B-shaped editing."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    dtype = torch.bfloat16

    def materialise(build):
        return random_weights(build, "cpu", dtype)

    planner = materialise(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(  # Qwen2.5-VL-7B shapes
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584))))
    encoder = materialise(lambda: Qwen3ForCausalLM(Qwen3Config(  # Qwen3-4B shapes (klein-4B's text encoder)
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=151936)))
    spec = REAL["flux_klein_4b"]
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        planner.to(device)
        ids = torch.randint(0, 150000, (1, 2048), device=device)  # ~1.3k vision + prompt tokens as text
        planner.model.language_model(input_ids=ids)
        plan_peak = torch.cuda.max_memory_allocated(device)
        planner.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        encoder.to(device)
        for _ in range(3):  # main prompt + 2 hints, 512 tokens each
            encoder(input_ids=torch.randint(0, 150000, (1, 512), device=device), output_hidden_states=True)
        transformer = random_transformer(spec, device, dtype)
        inputs, _ = transformer_inputs("flux_klein_4b", spec, grid, 2, device, dtype)
        transformer(**inputs)
        edit_peak = torch.cuda.max_memory_allocated(device)
    row = {"planner_7b_peak_gb": round(plan_peak / 2**30, 2), "klein_4b_edit_peak_gb": round(edit_peak / 2**30, 2),
           "stage_offload_peak_gb": round(max(plan_peak, edit_peak) / 2**30, 2)}
    print(row, flush=True)
    return row


def to_markdown(report: dict) -> str:
    lines = [f"# Backbone benchmark ({report['env']['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()] + [""]
    rows = report["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "–")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grid", type=int, default=64, help="GPU: latent patch grid per side (64 = 1024 px)")
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("--backends", nargs="+", default=["dense", "flex"])
    ap.add_argument("--stage-offload-peak", action="store_true", help="GPU: also measure the stage-offload peak")
    add_output_flags(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        rows = bench_gpu(device, args.repeats, args.grid, args.regions, args.backends)
    else:
        rows = bench_cpu(args.repeats)
    report = {"env": environment(device), "rows": rows}
    if device.type == "cuda" and args.stage_offload_peak:
        report["stage_offload"] = bench_stage_offload_peak(device, args.grid)
    write_report(f"backbones-{device.type}", args, report, to_markdown(report))


if __name__ == "__main__":
    main()
