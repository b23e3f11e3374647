"""Region-attention cost on whole edits: region edit vs stock edit per backbone, eager and compiled.

    python benchmark/backbones.py                          # CPU: the tiny pipelines, eager and compiled
    python benchmark/backbones.py --no-compile             # eager only (compiling takes ~1 min per backbone on CPU)
    python benchmark/backbones.py --device cuda --stage-offload-peak   # GPU: plan-then-edit peak with stage offload

On the tiny random components (CPU) this measures the overhead replan adds to a full edit — encoding the hints,
layout, masks, the masked passes — not real speed; the goal (reported, never asserted) is region / stock ≤ 1.2x.
Hints run padded as official and trimmed. Compiled: the editor's ``compile()`` (regional, inductor); the first edit
pays the compile (reported), the rest reuse it. Real-shape GPU numbers: ``benchmark/gpu_region_attention.py``.
Writes ``outputs/benchmarks/backbones-<device>.{json,md}`` (``--save``: ``benchmark/results/``).
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
from common import add_output_flags, environment, once, timed, to_markdown, write  # noqa: E402
from gpu_region_attention import REAL, random_transformer, random_weights, transformer_inputs  # noqa: E402

from replan.backbones import load_editor  # noqa: E402
from replan.plan import Region, RegionPlan  # noqa: E402

PLAN = RegionPlan("make it warm", (Region((10, 10, 90, 80), "a red cat"), Region((120, 60, 230, 170), "a dog")))
STEPS = 4


# --------------------------------------------------------------------------------------------------- CPU: pipelines
def tiny_editors(root: Path, names: list[str]):
    from replan.testing import save_tiny_kontext
    from replan.testing.klein import TINY_KLEIN_EDITOR_KWARGS, save_tiny_klein
    from replan.testing.qwen_image import save_tiny_qwen_edit

    klein_kwargs = {**TINY_KLEIN_EDITOR_KWARGS, "max_area": 256 * 256}
    builders = {
        "flux_kontext": lambda: (load_editor("flux", str(save_tiny_kontext(root / "k")), device="cpu",
                                             editor_kwargs={"max_area": 256 * 256}), {"max_sequence_length": 64}),
        "qwenimageedit": lambda: (load_editor("qwen", str(save_tiny_qwen_edit(root / "q")), device="cpu"), {}),
        "qwenimageedit2511": lambda: (load_editor("qwen2511", str(save_tiny_qwen_edit(
            root / "q2", plus=True, zero_cond_t=True)), device="cpu"), {}),
        "flux_klein": lambda: (load_editor("klein", str(save_tiny_klein(root / "kl", distilled=True)), device="cpu",
                                           editor_kwargs=klein_kwargs), {"max_sequence_length": 64}),
        "flux_klein_base": lambda: (load_editor("flux_klein_base", str(save_tiny_klein(root / "kb")), device="cpu",
                                                editor_kwargs=klein_kwargs), {"max_sequence_length": 64}),
    }
    for name in names:
        editor, options = builders[name]()
        editor.pipe.set_progress_bar_config(disable=True)
        yield name, editor, options


def edit_times(editor, image, options, repeats, prefix) -> dict:
    cpu = torch.device("cpu")
    stock = timed(lambda: editor.edit(image, RegionPlan(PLAN.global_prompt), steps=STEPS, **options), cpu, repeats)
    row = {f"{prefix}stock_ms": round(stock, 1)}
    for hints, trim in (("padded", False), ("trimmed", True)):
        region = timed(lambda: editor.edit(image, PLAN, steps=STEPS, trim_hint_padding=trim, **options), cpu, repeats)
        row[f"{prefix}region_{hints}_ms"] = round(region, 1)
        row[f"{prefix}region_{hints}_over_stock"] = round(region / stock, 3)
    return row


def bench_cpu(repeats: int, names: list[str], compile_: bool) -> list[dict]:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions
    edit.calculate_dimensions = lambda area, ratio: original(256 * 256, ratio)
    plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE = 256 * 256, 128 * 128
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, editor, options in tiny_editors(Path(tmp), names):
            row = {"backbone": name, "steps": STEPS, **edit_times(editor, image, options, repeats, "eager_")}
            if compile_:
                editor.compile()
                cpu = torch.device("cpu")
                row["first_compiled_stock_s"] = round(once(lambda: editor.edit(
                    image, RegionPlan(PLAN.global_prompt), steps=STEPS, **options), cpu), 1)
                row["first_compiled_region_s"] = round(once(lambda: editor.edit(
                    image, PLAN, steps=STEPS, **options), cpu), 1)
                row.update(edit_times(editor, image, options, repeats, "compiled_"))
            rows.append(row)
            print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- GPU: offload
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
        inputs, _ = transformer_inputs("flux_klein_4b", {**spec, "grid": grid}, 2, device, dtype)
        transformer(**inputs)
        edit_peak = torch.cuda.max_memory_allocated(device)
    row = {"planner_7b_peak_gb": round(plan_peak / 2**30, 2), "klein_4b_edit_peak_gb": round(edit_peak / 2**30, 2),
           "stage_offload_peak_gb": round(max(plan_peak, edit_peak) / 2**30, 2)}
    print(row, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbones", nargs="+", default=["flux_kontext", "qwenimageedit", "qwenimageedit2511",
                                                        "flux_klein", "flux_klein_base"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time compiled edits (CPU)")
    ap.add_argument("--grid", type=int, default=64, help="GPU: latent patch grid per side (64 = 1024 px)")
    ap.add_argument("--stage-offload-peak", action="store_true", help="GPU: measure the stage-offload peak")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    report = {"env": environment(device)}
    sections = {}
    if device.type == "cuda":
        if args.stage_offload_peak:
            report["stage_offload"] = bench_stage_offload_peak(device, args.grid)
            sections["Stage offload"] = [report["stage_offload"]]
    else:
        report["rows"] = bench_cpu(args.repeats, args.backbones, args.compile)
        sections["Edits"] = report["rows"]
    notes = ["Tiny random components: the overhead replan adds, not real speed. Goal: region / stock <= 1.2x."]
    write("backbones", device, report, to_markdown("Backbone benchmark", report, sections, notes), args.save,
          args.out)


if __name__ == "__main__":
    main()
