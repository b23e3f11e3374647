"""The app's logic as plain functions: annotator value ↔ plan, the attention matrix, the mask preview, editing.

Nothing here imports gradio, so every callback is tested without a browser. Bad input raises ``AppError`` with a
message for the person at the screen; the UI shows it and keeps working.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from replan.attention import GroupMembership, RuleSet, TokenLayout, default_rules, dense_mask, short_label
from replan.coords import box_area, clip_box
from replan.images import check_image_size, to_rgb
from replan.plan import Region, RegionPlan

PALETTE = [(0, 200, 100), (255, 59, 48), (10, 132, 255), (255, 204, 0), (191, 90, 242), (255, 159, 10),
           (100, 210, 255), (255, 55, 95)]
MAX_REGIONS = 16


class AppError(ValueError):
    """A problem to show in the UI (bad upload, nothing to plan, invalid plan file, …)."""


# ------------------------------------------------------------------------------------------------ image + boxes
def as_image(value) -> Image.Image:
    """The annotator's image (numpy HWC uint8 or PIL) as RGB PIL, within the size limits."""
    if value is None:
        raise AppError("Upload an image first (or pick an example).")
    image = Image.fromarray(np.asarray(value).astype(np.uint8)) if not isinstance(value, Image.Image) else value
    image = to_rgb(image)
    try:
        check_image_size(image.size)
    except ValueError as e:
        raise AppError(str(e)) from None
    return image


def plan_to_annotator(image: Image.Image, plan: RegionPlan) -> dict:
    """Annotator value: the image and one box per region, labelled with its hint."""
    boxes = []
    for i, region in enumerate(plan.regions):
        x1, y1, x2, y2 = region.bbox
        boxes.append({"xmin": int(round(x1)), "ymin": int(round(y1)), "xmax": int(round(x2)), "ymax": int(round(y2)),
                      "label": region.hint, "color": PALETTE[i % len(PALETTE)]})
    return {"image": np.asarray(image), "boxes": boxes}


def annotator_to_plan(value: dict | None, global_prompt: str) -> tuple[RegionPlan, list[str]]:
    """The plan the person drew, and notes on what was left out: boxes with no area, no hint, or nothing inside the
    image. A box partly outside the image is kept as it is: the editor expands it, then clamps it (official)."""
    if not value or value.get("image") is None:
        raise AppError("Upload an image first (or pick an example).")
    image = as_image(value["image"])
    regions, notes = [], []
    for i, box in enumerate(value.get("boxes") or [], 1):
        coords = [box.get(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in coords):
            raise AppError(f"Box {i} is incomplete; delete it and draw it again.")
        (x1, x2), (y1, y2) = sorted(float(c) for c in coords[::2]), sorted(float(c) for c in coords[1::2])
        hint = str(box.get("label") or "").strip()
        if not hint:
            notes.append(f"box {i} has no hint; left out (give it one to use it)")
        elif x2 <= x1 or y2 <= y1:
            notes.append(f"box {i} has no area; left out")
        elif box_area(clip_box((x1, y1, x2, y2), image.size)) <= 0:
            notes.append(f"box {i} lies outside the image; left out")
        else:
            regions.append(Region((x1, y1, x2, y2), hint))
    if len(regions) > MAX_REGIONS:
        raise AppError(f"{len(regions)} boxes: the app takes at most {MAX_REGIONS}; delete some.")
    return RegionPlan(global_prompt or "", tuple(regions), image_size=image.size), notes


# ------------------------------------------------------------------------------------------------ attention matrix
def matrix_groups(n_regions: int, has_image_prompt: bool) -> list[str]:
    """Split group names in the demo's order: Main, [Image Prompt], per region Hint/Noise BBox/Image BBox, BGs."""
    names = ["Main Prompt"] + (["Image Prompt"] if has_image_prompt else [])
    for i in range(1, n_regions + 1):
        names += [f"Hint {i}", f"Noise BBox {i}", f"Image BBox {i}"]
    return names + ["Noise Background", "Image Background"]


def default_matrix(n_regions: int, has_image_prompt: bool) -> list[list]:
    """Rows ``[query label, allowed…]``: the split defaults with Noise Background ↛ Noise BBox (the official demo's
    "locality" rules), used for the steps before the switch."""
    groups = matrix_groups(n_regions, has_image_prompt)
    rules = default_rules(n_regions, split=True, noise_bg_attend_noise_bbox=False, has_image_prompt=has_image_prompt)
    m = rules.matrix(groups)
    return [[short_label(g)] + [bool(v) for v in m[a].tolist()] for a, g in enumerate(groups)]


def matrix_headers(n_regions: int, has_image_prompt: bool) -> list[str]:
    return ["q \\ k"] + [short_label(g) for g in matrix_groups(n_regions, has_image_prompt)]


def matrix_to_rules(rows, n_regions: int, has_image_prompt: bool) -> RuleSet:
    """The matrix (a list of rows or a pandas DataFrame) → a RuleSet over split names."""
    if hasattr(rows, "values"):
        rows = rows.values.tolist()
    groups = matrix_groups(n_regions, has_image_prompt)
    if len(rows) != len(groups) or any(len(r) != len(groups) + 1 for r in rows):
        raise AppError("The attention matrix does not match the regions; press 'Reset matrix'.")
    pairs = [(q, k) for q, row in zip(groups, rows) for k, v in zip(groups, row[1:]) if _truthy(v)]
    return RuleSet.from_pairs(pairs, "custom")


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "1", "✓")) or v == 1


def resize_matrix(rows, n_regions: int, has_image_prompt: bool) -> list[list]:
    """Keep the cells of groups that still exist (by name), default the new ones."""
    fresh = default_matrix(n_regions, has_image_prompt)
    if rows is None or (hasattr(rows, "empty") and rows.empty) or len(rows) == 0:
        return fresh
    if hasattr(rows, "values"):
        rows = rows.values.tolist()
    old = {}
    labels = [r[0] for r in rows]
    for r in rows:
        for key, v in zip(labels, r[1:]):
            old[(r[0], key)] = _truthy(v)
    new_labels = [r[0] for r in fresh]
    return [[q] + [old.get((q, k), cell) for k, cell in zip(new_labels, row[1:])] for q, row in zip(new_labels, fresh)]


# ------------------------------------------------------------------------------------------------ mask preview
def kept_region_count(value: dict | None) -> int:
    """How many of the drawn boxes become regions (boxes without a hint or area are left out)."""
    try:
        return len(annotator_to_plan(value, "")[0].regions)
    except AppError:
        return 0


def mask_preview(image: Image.Image, plan: RegionPlan, rules: RuleSet, grid_size: tuple[int, int],
                 has_image_prompt: bool, expand: float = 0.0, expand_mode: str = "ratio") -> Image.Image:
    """Which noise patches may read which hint under ``rules``: each patch tinted with the colour of every hint it
    sees (mixed where it sees several); patches that see no hint stay grey. Boxes are expanded as the editor will
    expand them."""
    from replan.backbones.base import executed_boxes, region_patch_masks

    n = len(plan.regions)
    grid_h, grid_w = grid_size
    layout = TokenLayout.build(2 if has_image_prompt else 1, [1] * n, (grid_h, grid_w), [(grid_h, grid_w)],
                               image_prompt=(1, 2) if has_image_prompt else None)
    boxes = executed_boxes(plan, expand, expand_mode, image.size)
    layout = layout.with_mask_regions(region_patch_masks(plan.masks, boxes, image.size, layout.grids))
    mask = dense_mask(GroupMembership.from_layout(layout), rules)[0, 0]
    noise = slice(layout.text_len, layout.text_len + grid_h * grid_w)
    colours = torch.tensor(PALETTE, dtype=torch.float32)[torch.arange(n) % len(PALETTE)] if n else torch.zeros(0, 3)
    sees = torch.stack([mask[noise, a] for a, _ in layout.hints], dim=1).float() if n else torch.zeros(0)
    tint = torch.full((grid_h * grid_w, 3), 128.0)
    if n:
        count = sees.sum(1, keepdim=True)
        tint = torch.where(count > 0, (sees @ colours) / count.clamp(min=1), tint)
    overlay = Image.fromarray(tint.view(grid_h, grid_w, 3).byte().numpy()).resize(image.size, Image.NEAREST)
    preview = Image.blend(image.convert("RGB"), overlay, 0.55)
    draw = ImageDraw.Draw(preview)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = clip_box(box, image.size)  # an expanded box is clamped; one outside the image is inverted
        if x2 > x1 and y2 > y1:
            draw.rectangle((x1, y1, x2, y2), outline=PALETTE[i % len(PALETTE)], width=2)
    return preview
