"""Region masks: a region of arbitrary shape is a binary ``(H, W)`` mask in original-image pixels, stored in JSON
run-length encoded (``{"size": [H, W], "counts": [...]}``, row-major runs starting with a run of zeros).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from replan.coords import Box, Size


def as_mask(mask) -> np.ndarray:
    """A 2-D bool mask (read-only numpy copy) from an array, a tensor or a PIL image (nonzero pixels are inside)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L")) > 0
    elif hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a region mask must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"a region mask must be boolean or numeric, got dtype {arr.dtype}")
        arr = arr != 0
    arr = np.array(arr, dtype=bool, order="C", copy=True)
    arr.setflags(write=False)
    return arr


def mask_bbox(mask: np.ndarray) -> Box:
    """Bounding box ``[x1, y1, x2, y2]`` (exclusive ends) of a non-empty 2-D mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Row-major run-length encoding: alternating run lengths, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle) -> np.ndarray:
    """Inverse of ``mask_to_rle``; raises ``ValueError`` on a malformed encoding."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"a region mask must be {{'size': [H, W], 'counts': [...]}}, got {str(rle):.100}")
    size, counts = rle["size"], rle["counts"]
    ok = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ok = ok and isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                 for c in counts)
    if not ok:
        raise ValueError(f"a region mask needs size [H, W] (positive ints) and counts (ints >= 0), got {str(rle):.100}")
    h, w = size
    if sum(counts) != h * w:
        raise ValueError(f"region mask run lengths sum to {sum(counts)}, not {h}x{w}={h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (W, H)."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(img.resize(tuple(size), Image.NEAREST)) > 127
