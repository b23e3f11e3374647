"""Worker of tests/test_parallel_cp.py: Ulysses-2 region edits on the tiny backbones against one-process edits.

Run as two gloo ranks (``replan.testing.parallel.launch(2, "tests.cp_proof", [OUT_DIR, BACKBONE…])``). Every rank
loads each backbone as a one-process reference and as Ulysses-2 editors — plain (text padded to the split),
"anything" (unequal chunks) and, for Kontext, compiled (dynamo, whole graphs) — runs the same edits on each and
writes ``OUT_DIR/rank<r>.json``: per case the largest difference of the final latents from the one-process run, the
text padding, the padded passes, the mask builds per rule set and the graphs compiled. One case runs the parallel
editor with the mask left in the natural token order, to show that the arrangement matters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from replan.plan import Region, RegionPlan

SIZE = (128, 96)


def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


def plans() -> dict[str, RegionPlan]:
    one = [Region([8, 8, 60, 50], "a red apple")]
    two = [Region([8, 8, 70, 60], "a red apple"), Region([40, 30, 120, 90], "a small blue bird sitting on top")]
    return {"plain": RegionPlan("make it warmer", [], image_size=SIZE),
            "one": RegionPlan("replace the object", one, image_size=SIZE),
            "overlap": RegionPlan("two things", two, image_size=SIZE)}


# backbone → [(case, plan, edit options)]; options may name the editor variant to compare ("anything")
CASES = {
    "tiny": [
        ("unmasked", "plain", {"max_sequence_length": 64}),
        ("unmasked_padded", "plain", {"max_sequence_length": 63}),
        ("masked", "one", {"max_sequence_length": 64}),
        ("overlap", "overlap", {"max_sequence_length": 64}),
        ("switch", "overlap", {"max_sequence_length": 64, "steps": 3, "switch": 0.5}),
        ("trimmed", "overlap", {"max_sequence_length": 64, "trim_hint_padding": True}),
        ("trimmed_anything", "overlap", {"max_sequence_length": 64, "trim_hint_padding": True, "variant": "anything"}),
        ("natural_order", "overlap", {"max_sequence_length": 64, "variant": "natural"}),
        ("compiled", "overlap", {"max_sequence_length": 64, "trim_hint_padding": True, "steps": 3, "switch": 0.5,
                                 "variant": "compiled"}),
        ("compiled_again", "overlap", {"max_sequence_length": 64, "trim_hint_padding": True, "steps": 3,
                                       "switch": 0.5, "variant": "compiled"}),
    ],
    "tiny_qwen": [
        ("unmasked", "plain", {}),
        ("overlap", "overlap", {}),
        ("one", "one", {}),
        ("one_anything", "one", {"variant": "anything"}),
    ],
    "tiny_klein": [
        ("unmasked", "plain", {"max_sequence_length": 64}),
        ("trimmed", "overlap", {"max_sequence_length": 64, "trim_hint_padding": True}),
        ("switch", "one", {"max_sequence_length": 64, "steps": 3, "switch": 0.5}),
    ],
}


def final_latents(editor, img, plan, options) -> tuple[torch.Tensor, object]:
    captured = {}

    def grab(pipe, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"].detach().clone()
        return kwargs

    result = editor.edit(img, plan, seed=0, callback=grab, **{"steps": 2, **options})
    return captured["latents"], result


def parallel_editor(backbone: str, anything: bool = False, compiled: bool = False):
    from diffusers import ContextParallelConfig

    from replan.backbones import load_editor

    editor = load_editor(backbone, device="cpu")
    editor.enable_parallel(ContextParallelConfig(ulysses_degree=2, ulysses_anything=anything))
    if compiled:
        editor.compile(backend="eager")  # dynamo's whole graphs (fullgraph) without inductor's CPU compile time
    editor.pipe.set_progress_bar_config(disable=True)
    return editor


def run(backbone: str, report: dict) -> None:
    from torch._dynamo.utils import counters

    from replan.backbones import load_editor

    ref = load_editor(backbone, device="cpu")
    ref.pipe.set_progress_bar_config(disable=True)
    variants = {"plain": parallel_editor(backbone), "anything": parallel_editor(backbone, anything=True)}
    if any(o.get("variant") == "compiled" for _, _, o in CASES[backbone]):
        variants["compiled"] = parallel_editor(backbone, compiled=True)
    img, all_plans = image(), plans()
    for case, plan_name, options in CASES[backbone]:
        options = dict(options)
        variant = options.pop("variant", "plain")
        editor = variants["plain" if variant == "natural" else variant]
        expected, _ = final_latents(ref, img, all_plans[plan_name], options)
        graphs = counters["stats"]["unique_graphs"]
        split, padded = editor.processors.ulysses, editor.processors.padded_passes
        if variant == "natural":  # the mask in [text ; image] order, as if there were no all-to-all
            editor.processors.ulysses = None
        try:
            got, result = final_latents(editor, img, all_plans[plan_name], options)
        finally:
            editor.processors.ulysses = split
        attention = result.attention
        report[f"{backbone}/{case}"] = {
            "diff": float((got - expected).abs().max()),
            "scale": float(expected.abs().max()),
            "pad": attention.cp.pad if attention is not None and attention.cp is not None else None,
            "padded_passes": editor.processors.padded_passes - padded,
            "text_len": attention.layout.text_len if attention is not None else None,
            "builds": dict(attention.builds) if attention is not None else {},
            "rule_sets": len(attention.schedule.rule_sets) if attention is not None else 0,
            "graphs": counters["stats"]["unique_graphs"] - graphs,
        }


def main(argv=None) -> int:
    import pytest

    import replan.distributed as distributed
    from replan.testing.qwen_image import small_qwen_sizes

    argv = sys.argv[1:] if argv is None else argv
    out, backbones = Path(argv[0]), argv[1:] or list(CASES)
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    rank = torch.distributed.get_rank()
    report = {}
    with pytest.MonkeyPatch.context() as mp:
        small_qwen_sizes(mp)
        for backbone in backbones:
            run(backbone, report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
