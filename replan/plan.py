"""Plans: a global prompt plus regions (box + local hint), as a first-class, JSON-serialisable artifact.

A ``RegionPlan`` is what the planner writes and what an editor executes. Boxes are ``[x1, y1, x2, y2]`` in
**original-image pixels** (see ``replan.coords``). Parse planner text with ``replan.parse.parse_plan``.

A region may also carry a binary ``mask`` (``(H, W)`` bool, original-image pixels) for an arbitrary shape; its
``bbox`` then equals the mask's bounding box, so everything box-based keeps working. In JSON a mask is stored
run-length encoded (``{"size": [H, W], "counts": [...]}``, row-major runs starting with a run of zeros); plans
without masks read and write exactly as before (schema version 1). Masks: ``replan.region_masks``; drawing:
``replan.overlay`` (both re-exported here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from replan.coords import Box, Size, as_box, box_area, clip_box, expand_box, scale_box
from replan.overlay import draw_overlay  # noqa: F401  (re-exported: the plan API in one place)
from replan.region_masks import as_mask, mask_bbox, mask_to_rle, resize_mask, rle_to_mask  # noqa: F401

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
            raise ValueError(f"region box {format_box(self.bbox)} has zero area: need x2 > x1 and y2 > y1")
        if not isinstance(self.hint, str) or not self.hint.strip():
            raise ValueError(f"region {format_box(self.bbox)} needs a non-empty hint string, got {self.hint!r}")
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
                raise ValueError(f"region {format_box(self.bbox)} has an empty mask: a mask needs at least one pixel")
            if mask_bbox(mask) != self.bbox:
                raise ValueError(
                    f"region box {format_box(self.bbox)} is not its mask's bounding box {format_box(mask_bbox(mask))}; "
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
                    f"region {i} box {format_box(r.bbox)} lies outside the {w}x{h} image; fix the box, or use "
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
                    raise ValueError(f"region mask {format_box(r.bbox)} vanishes when rescaled to {tuple(image_size)}")
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
                    f"region {i}: box {format_box(r.bbox)} lies outside the {size[0]}x{size[1]} image; dropped"
                )
                continue
            if box != r.bbox:
                repairs.append(f"region {i}: box {format_box(r.bbox)} clipped to {format_box(box)}")
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


# --------------------------------------------------------------------------------------------------- numbers
def _num(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 3)


def _exact(v: float):
    """A coordinate for JSON without loss (``_num`` rounds, for messages): ints stay ints, floats keep every digit."""
    return int(v) if float(v).is_integer() else float(v)


def format_box(box) -> str:
    """A box for a message: ``[10, 20, 30.5, 40]`` (whole numbers without a decimal point, others to 3 places)."""
    return "[" + ", ".join(str(_num(v)) for v in box) + "]"
