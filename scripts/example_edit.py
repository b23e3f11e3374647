"""Execute a saved plan on an image with a region editor, writing the edited image and the plan overlay.

    # offline, tiny random weights (output is noise; shows the whole path in seconds):
    python scripts/example_edit.py --tiny --image assets/examples/desk.png --plan assets/examples/desk.plan.json
    # real FLUX.1 Kontext [dev] weights (hub id or local dir), on a GPU:
    python scripts/example_edit.py --backbone flux --device cuda --image assets/examples/desk.png \\
        --plan assets/examples/desk.plan.json

Writes ``result.png``, ``overlay.png`` (the expanded boxes the editor used) and ``plan.json`` to ``--output_dir``.
The planner and ``python -m replan.infer`` come with the planner issue; this script only executes a plan.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from replan.backbones import load_editor, names
from replan.images import load_image
from replan.plan import RegionPlan, draw_overlay


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True, help="input image path")
    ap.add_argument("--plan", required=True, help="plan JSON (RegionPlan.save format)")
    ap.add_argument("--output_dir", default="outputs/example")
    ap.add_argument("--backbone", default="flux_kontext", help=f"one of {', '.join(names())}")
    ap.add_argument("--model", default=None, help="hub id or local pipeline directory (default: the backbone's)")
    ap.add_argument("--tiny", action="store_true", help="use tiny random offline components (no weights needed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expand", type=float, default=None)
    ap.add_argument("--switch_ratio", type=float, default=None)
    ap.add_argument("--attention", choices=["dense", "flex"], default="dense")
    args = ap.parse_args(argv)
    try:
        image = load_image(args.image)
        plan = RegionPlan.load(args.plan)
        model, editor_kwargs = args.model, {}
        if args.tiny:
            from replan.testing import save_tiny_kontext

            model = str(save_tiny_kontext(Path(tempfile.mkdtemp()) / "tiny_kontext"))
            editor_kwargs = {"max_area": 256 * 256}
            print("using TINY RANDOM weights: the output is noise, only the code path is real", file=sys.stderr)
        editor = load_editor(args.backbone, model, device=args.device, torch_dtype=args.dtype,
                             editor_kwargs=editor_kwargs)
        t = time.perf_counter()
        result = editor.edit(image, plan, steps=args.steps, seed=args.seed, expand=args.expand,
                             switch=args.switch_ratio, attention=args.attention)
        elapsed = time.perf_counter() - t
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.image.save(out / "result.png")
    draw_overlay(image, result.plan, boxes=result.boxes).save(out / "overlay.png")
    result.plan.save(out / "plan.json")
    print(f"edited {image.size[0]}x{image.size[1]} with {len(plan.regions)} region(s) in {elapsed:.2f}s → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
