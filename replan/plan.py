"""Plans: a global prompt plus regions (box + local hint), as a first-class, JSON-serialisable artifact.

A ``RegionPlan`` is what the planner writes and what an editor executes. Boxes are ``[x1, y1, x2, y2]`` in
**original-image pixels** (see ``replan.coords``). Parse planner text with ``replan.parse.parse_plan``.

A region may also carry a binary ``mask`` (``(H, W)`` bool, original-image pixels) for an arbitrary shape; its
``bbox`` then equals the mask's bounding box, so everything box-based keeps working. In JSON a mask is stored
run-length encoded (``{"size": [H, W], "counts": [...]}``, row-major runs starting with a run of zeros); plans
without masks read and write exactly as before (schema version 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from replan.coords import Box, Size, as_box, box_area, clip_box, expand_box, scale_box

SCHEMA_VERSION = 1
NO_GLOBAL_EDIT = "keep remaining part of image unchanged."  # the planner's placeholder for "no global edit"


@dataclass(frozen=True)
class Region:
    """One region of a plan: a box in original-image pixels, a local hint, and the planner's optional point.

    ``mask`` (optional): a binary ``(H, W)`` mask in original-image pixels giving the region an arbitrary shape; the
    box must then be the mask's bounding box (``Region.from_mask`` computes it).
    """

    bbox: Box
    hint: str
    point: tuple[float, float] | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "bbox", as_box(self.bbox))
        x1, y1, x2, y2 = self.bbox
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"region box {_fmt_box(self.bbox)} has zero area: need x2 > x1 and y2 > y1")
        if not isinstance(self.hint, str) or not self.hint.strip():
            raise ValueError(f"region {_fmt_box(self.bbox)} needs a non-empty hint string, got {self.hint!r}")
        if self.point is not None:
            try:
                p = tuple(float(v) for v in self.point)
            except (TypeError, ValueError, OverflowError):
                p = ()
            if len(p) != 2 or not all(math.isfinite(v) for v in p):
                raise ValueError(f"region point must be two finite numbers [x, y], got {self.point!r}")
            object.__setattr__(self, "point", p)
        if self.mask is not None:
            mask = as_mask(self.mask)
            if not mask.any():
                raise ValueError(f"region {_fmt_box(self.bbox)} has an empty mask: a mask needs at least one pixel")
            if mask_bbox(mask) != self.bbox:
                raise ValueError(
                    f"region box {_fmt_box(self.bbox)} is not its mask's bounding box {_fmt_box(mask_bbox(mask))}; "
                    "build mask regions with Region.from_mask(mask, hint)"
                )
            object.__setattr__(self, "mask", mask)

    @classmethod
    def from_mask(cls, mask, hint: str, point: tuple[float, float] | None = None) -> Region:
        """A region shaped by ``mask`` (``(H, W)`` bool-like: array, tensor or PIL image); its box is computed."""
        mask = as_mask(mask)
        if not mask.any():
            raise ValueError("a region mask needs at least one pixel; the mask is empty")
        return cls(mask_bbox(mask), hint, point, mask)

    @property
    def mask_size(self) -> Size | None:
        """(W, H) of the mask's frame, or None for a box region."""
        return None if self.mask is None else (self.mask.shape[1], self.mask.shape[0])

    def __eq__(self, other):
        if not isinstance(other, Region):
            return NotImplemented
        if (self.bbox, self.hint, self.point) != (other.bbox, other.hint, other.point):
            return False
        if self.mask is None or other.mask is None:
            return self.mask is None and other.mask is None
        return self.mask.shape == other.mask.shape and bool(np.array_equal(self.mask, other.mask))

    def to_dict(self) -> dict:
        d = {"bbox": [_exact(v) for v in self.bbox], "hint": self.hint}
        if self.point is not None:
            d["point"] = [_exact(v) for v in self.point]
        if self.mask is not None:
            d["mask"] = mask_to_rle(self.mask)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Region:
        if not isinstance(d, dict):
            raise ValueError(f"a region must be an object with 'bbox' and 'hint', got {d!r}")
        bbox = d.get("bbox", d.get("bbox_2d"))
        point = d.get("point", d.get("point_2d"))
        if bbox is None:
            raise ValueError(f"region {d!r} has no 'bbox'")
        mask = d.get("mask")
        return cls(bbox=bbox, hint=d.get("hint"), point=point, mask=None if mask is None else rle_to_mask(mask))


# --------------------------------------------------------------------------------------------------- masks
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


@dataclass(frozen=True)
class RegionPlan:
    """A global prompt and regions; plus what produced it (reasoning, raw planner text) and any repairs made."""

    global_prompt: str
    regions: tuple[Region, ...] = ()
    reasoning: str = ""
    image_size: Size | None = None  # (W, H) of the original image the boxes refer to
    raw_text: str = ""
    repairs: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "repairs", tuple(self.repairs))
        if self.image_size is not None:
            w, h = (int(v) for v in self.image_size)
            if w <= 0 or h <= 0:
                raise ValueError(f"plan image_size must be positive (W, H), got {self.image_size!r}")
            object.__setattr__(self, "image_size", (w, h))
            self._check_masks((w, h))
        if not isinstance(self.global_prompt, str):
            raise ValueError(f"global_prompt must be a string, got {type(self.global_prompt).__name__}")

    # ----------------------------------------------------------------------------------------------- accessors
    @property
    def prompt_text(self) -> str:
        """The global prompt as the editor receives it: an empty prompt becomes a single space, as official."""
        return self.global_prompt.strip() or " "

    @property
    def boxes(self) -> list[Box]:
        return [r.bbox for r in self.regions]

    @property
    def hints(self) -> list[str]:
        return [r.hint for r in self.regions]

    @property
    def masks(self) -> list[np.ndarray | None]:
        """Each region's pixel mask, or None for a box region."""
        return [r.mask for r in self.regions]

    # ----------------------------------------------------------------------------------------------- checks
    def _check_masks(self, image_size: Size) -> None:
        for i, r in enumerate(self.regions, 1):
            if r.mask is not None and r.mask_size != tuple(image_size):
                raise ValueError(
                    f"region {i} has a {r.mask_size[0]}x{r.mask_size[1]} mask but the image is "
                    f"{image_size[0]}x{image_size[1]}: a region mask must have the image's size (H, W) in pixels"
                )

    def check_image(self, image_size: Size) -> None:
        """Raise ``ValueError`` if this plan was made for an image of another size (or a mask has another size)."""
        self._check_masks(image_size)
        if self.image_size is not None and tuple(self.image_size) != tuple(image_size):
            raise ValueError(
                f"the plan was made for a {self.image_size[0]}x{self.image_size[1]} image but the image is "
                f"{image_size[0]}x{image_size[1]}; use plan.rescaled(({image_size[0]}, {image_size[1]})) to map "
                "its boxes onto this image, or plan again"
            )

    def validate(self, image_size: Size | None = None) -> None:
        """Check a plan given as input: every box overlaps the image (``Region`` already ensures it has area).

        A box partly outside the image is valid: the editor expands the raw box and clamps it afterwards, as
        official. A box entirely outside is refused (it usually means the boxes are in another frame).
        """
        size = image_size or self.image_size
        if size is None:
            return
        w, h = size
        for i, r in enumerate(self.regions, 1):
            if box_area(clip_box(r.bbox, size)) <= 0:
                raise ValueError(
                    f"region {i} box {_fmt_box(r.bbox)} lies outside the {w}x{h} image; fix the box, or use "
                    "plan.rescaled((W, H)) if the boxes were made for an image of another size"
                )

    # ----------------------------------------------------------------------------------------------- transforms
    def rescaled(self, image_size: Size) -> RegionPlan:
        """Map boxes and points onto an image of another size (needs ``image_size`` on this plan)."""
        if self.image_size is None:
            raise ValueError(
                "cannot rescale a plan without image_size: set plan.image_size to the planned image's size"
            )
        regions = []
        for r in self.regions:
            point = None
            if r.point is not None:
                point = tuple(scale_box((*r.point, *r.point), self.image_size, image_size)[:2])
            if r.mask is not None:
                mask = resize_mask(r.mask, image_size)
                if not mask.any():
                    raise ValueError(f"region mask {_fmt_box(r.bbox)} vanishes when rescaled to {tuple(image_size)}")
                regions.append(Region.from_mask(mask, r.hint, point))
                continue
            regions.append(Region(scale_box(r.bbox, self.image_size, image_size), r.hint, point))
        return replace(self, regions=tuple(regions), image_size=tuple(image_size))

    def clipped(self, image_size: Size | None = None) -> RegionPlan:
        """Clip boxes to the image; drop boxes left with no area. Every change is recorded in ``repairs``."""
        size = image_size or self.image_size
        if size is None:
            raise ValueError("clipping needs the image size: pass image_size=(W, H)")
        regions, repairs = [], list(self.repairs)
        for i, r in enumerate(self.regions, 1):
            if r.mask is not None and r.mask_size != tuple(size):
                raise ValueError(f"region {i} has a {r.mask_size[0]}x{r.mask_size[1]} mask; clipping cannot change a "
                                 f"mask's frame to {size[0]}x{size[1]}: use plan.rescaled(({size[0]}, {size[1]}))")
            box = clip_box(r.bbox, size)
            if box_area(box) <= 0:
                repairs.append(
                    f"region {i}: box {_fmt_box(r.bbox)} lies outside the {size[0]}x{size[1]} image; dropped"
                )
                continue
            if box != r.bbox:
                repairs.append(f"region {i}: box {_fmt_box(r.bbox)} clipped to {_fmt_box(box)}")
            regions.append(replace(r, bbox=box))
        return replace(self, regions=tuple(regions), repairs=tuple(repairs), image_size=tuple(size))

    def expanded_boxes(self, value: float, mode: str = "ratio", image_size: Size | None = None) -> list[Box]:
        """Boxes grown as the editor will use them (official ``expand_bbox``): the raw box is expanded, then clamped
        to the image and int-truncated. A box entirely outside the image comes back inverted (``x1 > x2``): it covers
        no patch, as official."""
        size = image_size or self.image_size
        if size is None:
            raise ValueError("expanding boxes needs the image size: pass image_size=(W, H)")
        return [expand_box(r.bbox, size, value, mode) for r in self.regions]

    # ----------------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "global_prompt": self.global_prompt,
            "regions": [r.to_dict() for r in self.regions],
            "reasoning": self.reasoning,
            "image_size": list(self.image_size) if self.image_size else None,
            "raw_text": self.raw_text,
            "repairs": list(self.repairs),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RegionPlan:
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {version} is not supported (this replan reads {SCHEMA_VERSION})")
        if "global_prompt" not in d:
            raise ValueError("plan has no 'global_prompt'")
        regions = d.get("regions") or []
        if not isinstance(regions, list):
            raise ValueError("plan 'regions' must be a list")
        out = []
        for i, r in enumerate(regions, 1):
            try:
                out.append(Region.from_dict(r))
            except (ValueError, TypeError) as e:
                raise ValueError(f"plan region {i}: {e}") from None
        size = d.get("image_size")
        if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2):
            raise ValueError(f"plan 'image_size' must be [W, H], got {size!r}")
        for key in ("reasoning", "raw_text"):
            if not isinstance(d.get(key, "") or "", str):
                raise ValueError(f"plan '{key}' must be a string")
        repairs = d.get("repairs", []) or []
        if not isinstance(repairs, list) or not all(isinstance(r, str) for r in repairs):
            raise ValueError("plan 'repairs' must be a list of strings")
        return cls(
            global_prompt=d["global_prompt"],
            regions=tuple(out),
            reasoning=d.get("reasoning", "") or "",
            image_size=tuple(size) if size else None,
            raw_text=d.get("raw_text", "") or "",
            repairs=tuple(d.get("repairs", []) or []),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RegionPlan:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, too deep
            raise ValueError(f"plan file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"plan file {path}: {e}") from None

    def to_response(self) -> str:
        """Render in the planner grammar (``<think>…<gen_image>…<region>[…]``), e.g. to replay a hand-edited plan.

        The grammar has boxes only: a mask region is written as its bounding box. ``<`` and ``>`` inside hints are
        escaped in the JSON (``\\u003c``), so a hint containing tag text survives; a global prompt or reasoning
        containing a closing tag cannot be represented and raises ``ValueError``.
        """
        for name, text, tag in (("reasoning", self.reasoning, "</think>"),
                                ("global prompt", self.global_prompt, "</gen_image>")):
            if tag in text:
                raise ValueError(f"the {name} contains {tag!r}, which the planner grammar cannot hold")
        items = []
        for r in self.regions:
            item = {"bbox_2d": [_exact(v) for v in r.bbox]}
            if r.point is not None:
                item["point_2d"] = [_exact(v) for v in r.point]
            item["hint"] = r.hint
            items.append(item)
        region_json = json.dumps(items, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
        return (
            f"<think>{self.reasoning}</think><gen_image>{self.global_prompt}</gen_image>"
            f"<region>{region_json}</region>"
        )


# --------------------------------------------------------------------------------------------------- drawing
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


def _num(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 3)


def _exact(v: float):
    """A coordinate for JSON without loss (``_num`` rounds, for messages): ints stay ints, floats keep every digit."""
    return int(v) if float(v).is_integer() else float(v)


def _fmt_box(box) -> str:
    return "[" + ", ".join(str(_num(v)) for v in box) + "]"
