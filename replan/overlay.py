"""The plan drawn on its image: numbered boxes (or tinted masks) with their hints, for ``overlay.png`` and the app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from replan.coords import clip_box
from replan.region_masks import resize_mask

if TYPE_CHECKING:
    from replan.plan import RegionPlan

_COLORS = ["#00d26a", "#ff3b30", "#0a84ff", "#ffcc00", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f"]


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def draw_overlay(
    image: Image.Image, plan: RegionPlan, boxes: Sequence[Sequence[float]] | None = None, width: int | None = None
) -> Image.Image:
    """Draw numbered boxes and their hints on a copy of ``image`` (RGB).

    ``boxes`` overrides the plan's boxes (e.g. the expanded boxes the editor used); they are in ``image``'s pixels.
    A region with a mask is drawn as a translucent tint with the mask's outline instead of a rectangle.
    """
    canvas = image.convert("RGB").copy()
    w, h = canvas.size
    masked = [(i, r) for i, r in enumerate(plan.regions, 1) if r.mask is not None]
    if masked:
        tinted = np.asarray(canvas, dtype=np.float32).copy()
        for i, r in masked:
            color = np.array(ImageColor.getrgb(_COLORS[(i - 1) % len(_COLORS)]), dtype=np.float32)
            m = resize_mask(r.mask, (w, h))
            tinted[m] = 0.6 * tinted[m] + 0.4 * color
            inner = m.copy()
            inner[1:, :] &= m[:-1, :]
            inner[:-1, :] &= m[1:, :]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            edge = m & ~inner
            tinted[edge] = color
        canvas = Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    line = width or max(2, round(min(w, h) / 300))
    font = _font(max(12, round(min(w, h) / 40)))
    boxes = boxes if boxes is not None else plan.boxes
    for i, (box, region) in enumerate(zip(boxes, plan.regions), 1):
        color = _COLORS[(i - 1) % len(_COLORS)]
        x1, y1, x2, y2 = clip_box(box, (w, h))  # a box sticking out of the image is drawn clipped
        if x2 <= x1 or y2 <= y1:
            continue  # nothing of it lies inside the image
        if region.mask is None:
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=line)
        label = f"{i}: {region.hint}"
        if len(label) > 60:
            label = label[:57] + "..."
        tx, ty = x1 + line, max(0, y1 - font.size - 2 * line) if y1 > font.size + 2 * line else y1 + line
        left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=color)
        draw.text((tx, ty), label, fill="black", font=font)
    return canvas
