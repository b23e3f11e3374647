"""Draw the README picture: input, plan overlay, which patches read which hint, and the edited result.

    python scripts/readme_figure.py                          # offline: the result panel comes from tiny random
                                                             # weights (noise, labelled as such)
    python scripts/readme_figure.py --backbone flux --device cuda   # real FLUX.1 Kontext weights on a GPU

Uses the built-in example (``assets/examples/desk.png`` and its hand-written plan) and writes
``docs/replan-example.png`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from replan.app.callbacks import mask_preview
from replan.attention import default_rules
from replan.backbones.registry import resolve
from replan.io import write_outputs
from replan.pipeline import RePlanPipeline
from replan.plan import RegionPlan, draw_overlay

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples"
PANEL = (320, 240)


def font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def panel(image: Image.Image, title: str, note: str = "") -> Image.Image:
    out = Image.new("RGB", (PANEL[0], PANEL[1] + 44), "white")
    out.paste(image.convert("RGB").resize(PANEL, Image.LANCZOS), (0, 44))
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), title, fill="black", font=font(16))
    if note:
        draw.text((4, 23), note, fill=(90, 90, 90), font=font(12))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "replan-example.png"))
    args = ap.parse_args(argv)
    image = Image.open(EXAMPLE / "desk.png").convert("RGB")
    instruction = (EXAMPLE / "desk.txt").read_text(encoding="utf-8").strip()
    plan = RegionPlan.load(EXAMPLE / "desk.plan.json")

    pipe = RePlanPipeline.from_pretrained(args.backbone, planner=None, device=args.device)
    spec = resolve(args.backbone)
    out = pipe(image, plan=plan, seed=args.seed)
    gw, gh = out.edit.generation_size
    grid = (gh // pipe.editor.patch, gw // pipe.editor.patch)
    rules = default_rules(len(plan.regions), split=True, has_image_prompt=spec.has_image_prompt)
    attention = mask_preview(image, plan, rules, grid, spec.has_image_prompt, spec.defaults("cli").expand,
                             spec.expand_mode)
    tiny = spec.builder is not None
    panels = [
        panel(image, "1. input", f"“{instruction}”"[:52]),
        panel(draw_overlay(image, plan), "2. plan: global prompt + regions", "box + hint each (hand-written here)"),
        panel(attention, "3. region attention", "patches of box i read hint i only"),
        panel(out.image, "4. result, one denoising pass",
              "TINY RANDOM weights: noise (smoke run)" if tiny else f"{spec.name}, seed {args.seed}"),
    ]
    figure = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        figure.paste(p, (x, 0))
        x += p.width + 8
    target = Path(args.out)
    write_outputs(target.parent, {target.name: lambda p: figure.save(p, optimize=True)})
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
