"""Every coordinate conversion in replan, in one place.

Frames:

* **original**: pixels of the image the user gave, ``(W, H)``. Boxes live here: ``[x1, y1, x2, y2]``, x right,
  y down, exclusive ends (a box ``[0, 0, W, H]`` covers the whole image).
* **planner**: pixels of the image the VLM actually saw after its processor resized it (Qwen2.5-VL's
  ``smart_resize``). Qwen2.5-VL grounds boxes in this frame.
* **generation**: pixels of the image the editor generates (e.g. a preferred FLUX.1 Kontext resolution).
* **patch grid**: one token per ``patch x patch`` generation pixels (16 for every supported MMDiT: VAE factor 8 and
  2x2 latent packing), indexed row-major.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Box = tuple[float, float, float, float]
Size = tuple[int, int]  # (width, height)

# Which frame a planner reply's boxes are read in: "processor" (the frame the VLM saw after its processor resized the
# image, mapped back to original pixels; right at any size) or "original" (read as original-image pixels, as the
# official code does everywhere; off by up to ±14 px per side below ~12.8 MP and wrong above).
BOX_FRAMES = ("processor", "original")


def as_box(values: Sequence[float]) -> Box:
    """Return ``values`` as a 4-tuple of finite floats or raise ``ValueError`` naming the problem."""
    if isinstance(values, (str, bytes)) or len(values) != 4:
        raise ValueError(f"a box needs exactly 4 numbers [x1, y1, x2, y2], got {values!r}")
    out = []
    for v in values:
        try:
            finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise ValueError(f"box coordinates must be finite numbers, got {values!r:.200}")
        out.append(float(v))
    return tuple(out)  # type: ignore[return-value]


def scale_box(box: Sequence[float], src: Size, dst: Size) -> Box:
    """Map a box from a ``src`` frame of size (W, H) to a ``dst`` frame by independent x/y scaling.

    Computed as ``x * W_dst / W_src`` (one rounding), not ``x * (W_dst / W_src)``: a box edge on the frame's border
    then lands exactly on the other frame's border instead of an ulp outside it (which strict parsing rejects).
    """
    (sw, sh), (dw, dh) = src, dst
    x1, y1, x2, y2 = box
    return (x1 * dw / sw, y1 * dh / sh, x2 * dw / sw, y2 * dh / sh)


def planner_to_original(box: Sequence[float], planner_size: Size, original_size: Size) -> Box:
    """A box the planner produced in the frame it saw → original-image pixels (correct at any image size)."""
    return scale_box(box, planner_size, original_size)


def original_to_planner(box: Sequence[float], original_size: Size, planner_size: Size) -> Box:
    """Original-image pixels → the planner's frame (used to write training targets and prompts)."""
    return scale_box(box, original_size, planner_size)


def clip_box(box: Sequence[float], size: Size) -> Box:
    """Clip a box to ``[0, W] x [0, H]`` (it may become empty; callers decide what that means)."""
    w, h = size
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def box_area(box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def expand_box(box: Sequence[float], image_size: Size, value: float, mode: str = "ratio") -> tuple[int, int, int, int]:
    """Grow a box around its centre exactly as the official code does (replan-spec §2.3, step 1).

    ``mode="ratio"``: ``dx = (x2 - x1) * value``, ``dy = (y2 - y1) * value``; ``mode="pixels"``: ``dx = dy = value``.
    The result is clamped to the image and each coordinate truncated with ``int()``.
    """
    if mode not in ("ratio", "pixels"):
        raise ValueError(f"expand mode must be 'ratio' or 'pixels', got {mode!r}")
    if value < 0:
        raise ValueError(f"expand value must be >= 0, got {value}")
    w, h = image_size
    x1, y1, x2, y2 = as_box(box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {list(box)} has zero area (need x2 > x1 and y2 > y1)")
    dx, dy = ((x2 - x1) * value, (y2 - y1) * value) if mode == "ratio" else (value, value)
    return (int(max(0, x1 - dx)), int(max(0, y1 - dy)), int(min(w, x2 + dx)), int(min(h, y2 + dy)))


def box_to_patch_range(
    box: Sequence[float], original_size: Size, grid_size: tuple[int, int], patch: int = 16
) -> tuple[int, int, int, int]:
    """Original-pixel box → half-open patch range ``(r0, r1, c0, c1)`` on a ``(grid_h, grid_w)`` patch grid.

    The generation frame is ``grid * patch`` pixels. Rounding is outward (any partly covered patch is inside) and
    the range is clamped to the grid, as official (replan-spec §2.3, step 2).
    """
    grid_h, grid_w = grid_size
    s_x = grid_w * patch / original_size[0]
    s_y = grid_h * patch / original_size[1]
    x1, y1, x2, y2 = box
    c0 = min(max(math.floor(x1 * s_x / patch), 0), grid_w)
    c1 = min(max(math.ceil(x2 * s_x / patch), 0), grid_w)
    r0 = min(max(math.floor(y1 * s_y / patch), 0), grid_h)
    r1 = min(max(math.ceil(y2 * s_y / patch), 0), grid_h)
    return r0, r1, c0, c1


def box_to_patch_mask(
    box: Sequence[float], original_size: Size, grid_size: tuple[int, int], patch: int = 16
) -> torch.Tensor:
    """Original-pixel box → boolean ``(grid_h, grid_w)`` patch mask (the rectangle case of a region mask)."""
    r0, r1, c0, c1 = box_to_patch_range(box, original_size, grid_size, patch)
    mask = torch.zeros(grid_size, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


def pixel_mask_to_patch_mask(mask: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """A boolean pixel mask (H, W) in any frame → patch mask: a patch is inside if any of its pixels is (outward)."""
    if mask.ndim != 2:
        raise ValueError(f"pixel mask must be 2-D (H, W), got shape {tuple(mask.shape)}")
    pooled = torch.nn.functional.adaptive_max_pool2d(mask[None, None].float(), grid_size)
    return pooled[0, 0] > 0


def resolution_for_area(aspect_candidates: Sequence[Size], image_size: Size, multiple: int = 16) -> Size:
    """Pick the candidate (W, H) whose aspect ratio is closest to the image's, floored to ``multiple``.

    Ties resolve like ``min`` over ``(|aspect - w/h|, w, h)``, which is what the Kontext pipeline does.
    """
    aspect = image_size[0] / image_size[1]
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in aspect_candidates)
    return (w // multiple * multiple, h // multiple * multiple)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28
) -> tuple[int, int]:
    """The (height, width) Qwen2.5-VL's processor resizes an image to: sides rounded to multiples of ``factor``,
    scaled into ``[min_pixels, max_pixels]`` (defaults: the ``qwen_vl_utils`` values, 3136 and 12,845,056).

    Qwen2.5-VL grounds boxes in pixels of this frame; ``planner_to_original`` maps them back.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got {width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def processor_frame(image_size: Size, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28) -> Size:
    """(W, H) of the frame Qwen2.5-VL's processor gives an image of ``image_size`` (``smart_resize``, default bounds
    the ``qwen_vl_utils`` ones): what a planner reply's boxes refer to under ``box_frame="processor"``."""
    h, w = smart_resize(int(image_size[1]), int(image_size[0]), min_pixels=min_pixels, max_pixels=max_pixels)
    return (w, h)


def mask_to_patch_mask(mask, original_size: Size, grid_size: tuple[int, int], patch: int = 16) -> torch.Tensor:
    """Original-pixel bool mask ``(H, W)`` → ``(grid_h, grid_w)`` patch mask, rounding outward.

    A patch is inside if it overlaps any masked pixel once the mask is scaled onto the grid's generation frame
    (``grid * patch`` pixels): each masked pixel ``[x, x+1) x [y, y+1)`` contributes the patches
    ``box_to_patch_range`` gives its one-pixel box. A rectangular mask therefore yields exactly the box's patch mask
    (boxes are the rectangle case), and a mask already in the grid's frame gives ``pixel_mask_to_patch_mask``.
    """
    m = np.asarray(mask, dtype=bool)
    w, h = original_size
    if m.shape != (h, w):
        raise ValueError(f"region mask shape {m.shape} does not match the {w}x{h} image (need (H, W) = ({h}, {w}))")
    grid_h, grid_w = grid_size

    def footprint(n: int, cells: int) -> np.ndarray:  # (n, cells): pixel i touches cell j; same floats as boxes
        s = cells * patch / n
        lo = [min(max(math.floor(i * s / patch), 0), cells) for i in range(n)]
        hi = [min(max(math.ceil((i + 1) * s / patch), 0), cells) for i in range(n)]
        j = np.arange(cells)
        return (j >= np.asarray(lo)[:, None]) & (j < np.asarray(hi)[:, None])

    rows = footprint(h, grid_h).astype(np.float32)  # (H, gh)
    cols = footprint(w, grid_w).astype(np.float32)  # (W, gw)
    hits = rows.T @ m.astype(np.float32) @ cols
    return torch.from_numpy(hits > 0)
