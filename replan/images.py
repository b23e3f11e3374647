"""Loading and normalising input images.

Every image entering replan becomes 8-bit RGB (``PIL.Image`` mode ``"RGB"``):

* RGBA / LA / palette images with transparency are composited over **white** (transparent pixels would otherwise
  keep arbitrary colour values);
* greyscale (``L``, ``1``) is replicated to three channels;
* 16-bit images (``I;16``, or ``I`` with values above 255) are scaled by 255/65535; 32-bit ``I`` images above
  65535 by their maximum; ``I`` images within 0–255 are kept;
  float images (``F``) are assumed to be in [0, 1] when their maximum is ≤ 1, else in [0, 255];
* CMYK / YCbCr / LAB are converted with PIL.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 64
MAX_PIXELS = 16 * 1024 * 1024


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB as described in the module docstring."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "La":  # premultiplied alpha: PIL converts it to LA only
        image = image.convert("LA")
        mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I"):
        arr = np.asarray(image).astype(np.float64)
        top = arr.max(initial=0)
        peak = 65535.0 if mode.startswith("I;16") or 255 < top <= 65535 else max(float(top), 255.0)
        arr = np.clip(arr / peak * 255.0, 0, 255)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image).astype(np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """Open a path (or take a PIL image) and return it as RGB; ``ValueError`` with the path if it cannot be read."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def describe_limit(max_pixels: int = MAX_PIXELS) -> str:
    """The size limit as people read it: ``16.8 MP (4096x4096)``."""
    side = math.isqrt(max_pixels)
    square = f" ({side}x{side})" if side * side == max_pixels else ""
    return (f"{max_pixels / 1e6:.1f} MP" if max_pixels >= 100_000 else f"{max_pixels} pixels") + square


def check_image_size(size: tuple[int, int], min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> None:
    """Reject images the editors cannot handle sensibly, with the fix in the message."""
    w, h = size
    if min(w, h) < min_side:
        raise ValueError(f"image is {w}x{h}; both sides must be at least {min_side} px (upscale it first)")
    if w * h > max_pixels:
        raise ValueError(
            f"image is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is {describe_limit(max_pixels)}: downscale it first"
        )
