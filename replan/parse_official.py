"""Read a planner reply exactly as the official RePlan code reads it (``parse_plan(..., mode="official")``).

The official pipeline (replan-spec §1.6) takes the first ``<gen_image>…</gen_image>`` (stripped) as the global prompt
and ``json.loads`` of the first ``<region>…</region>`` (stripped) as the region list. Nothing is repaired:

* no ``<region>`` block, or a block that is not valid JSON, or an empty / null list → a plain global edit;
* an item without a (truthy) ``bbox_2d`` or ``hint`` is skipped;
* boxes are kept as written: a box partly or entirely outside the image is expanded and then clamped by the editor,
  as official; the hint is used as written (not stripped);
* the ``<think>`` block, text outside the tags and the block order do not matter; a ``<gen_image>`` that is never
  closed gives the empty prompt, which the editor receives as ``" "``.

Where the official code stops with an exception instead (a non-list region value, an item that is not an object, a
box that is not 4 numbers, a box with ``x2 <= x1`` or ``y2 <= y1``, a hint that is not text), replan runs the same
plain global edit and records why in ``plan.repairs``: the CLI and the eval generator would crash there and the
official reward server would answer HTTP 500. Numbers written as strings are read (``float("12")``, as official);
booleans, NaN and infinities are refused (the official code crashes on NaN and accepts the others by accident).
"""

from __future__ import annotations

import json
import math

from replan.coords import Size, planner_to_original
from replan.plan import Region, RegionPlan, format_box

GLOBAL_EDIT = "ran a plain global edit, as the official code does"


class _Unusable(Exception):
    """The official code would fail on this reply (a crash or HTTP 500): fall back to a global edit."""


def find_block(text: str, tag: str) -> tuple[str, tuple[int, int]] | None:
    """``<tag>body</tag>`` with the first opening tag and the first closing tag after it, or ``None``.

    Same result as ``re.search(r"<tag>(.*?)</tag>", text, re.S)`` but linear: that regex rescans to the end of the
    text from every unclosed opening tag, which takes minutes on a long degenerate reply (``"<think>" * 50_000``).
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    if end < 0:
        return None
    return text[start + len(open_tag) : end], (start, end + len(close_tag))


def parse_official(text: str, image_size: Size | None = None, planner_size: Size | None = None) -> RegionPlan:
    """The plan the official code would execute for ``text`` (sizes already validated by ``parse_plan``)."""
    gen = find_block(text, "gen_image")
    think = find_block(text, "think")
    notes: list[str] = []
    regions: tuple[Region, ...] = ()
    block = find_block(text, "region")
    if block is None:
        notes.append(f"no <region>…</region> block; {GLOBAL_EDIT}")
    else:
        try:
            data = json.loads(block[0].strip())
        except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, nesting too deep
            data = None
            notes.append(f"the region list is not valid JSON ({_reason(e)}); {GLOBAL_EDIT}")
        if data:
            try:
                regions = tuple(_regions(data, notes, image_size, planner_size))
            except _Unusable as e:
                regions = ()
                notes.append(f"{e}; the official code fails on this reply; {GLOBAL_EDIT}")
    return RegionPlan(
        global_prompt=gen[0].strip() if gen else "",
        regions=regions,
        reasoning=think[0].strip() if think else "",
        image_size=image_size,
        raw_text=text,
        repairs=tuple(notes),
    )


def _regions(data, notes: list[str], image_size, planner_size) -> list[Region]:
    if not isinstance(data, list):
        raise _Unusable(f"the region block holds a JSON {type(data).__name__}, not a list")
    out = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict):
            raise _Unusable(f"region {i} is a {type(item).__name__}, not an object")
        bbox, hint = item.get("bbox_2d"), item.get("hint")
        if not bbox or not hint:
            notes.append(f"region {i} has no bbox_2d or no hint; skipped, as official")
            continue
        box = _numbers(bbox, i)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise _Unusable(f"region {i} box {format_box(box)} has x2 <= x1 or y2 <= y1")
        if not isinstance(hint, str):
            raise _Unusable(f"region {i} hint is a {type(hint).__name__}, not text")
        if not hint.strip():
            notes.append(f"region {i} hint is blank; skipped (the official code would encode the blank text)")
            continue
        point = _point(item.get("point_2d"))  # generated but unused by the official code; kept for display
        if planner_size and image_size:
            box = planner_to_original(box, planner_size, image_size)
            if point is not None:
                point = planner_to_original([*point, *point], planner_size, image_size)[:2]
        out.append(Region(tuple(box), hint, point))
    return out


def _numbers(bbox, i: int) -> list[float]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise _Unusable(f"region {i} bbox_2d must be a list of 4 numbers, got {bbox!r:.80}")
    out = []
    for v in bbox:
        try:
            x = None if isinstance(v, bool) or not isinstance(v, (int, float, str)) else float(v)
        except (ValueError, OverflowError):
            x = None
        if x is None or not math.isfinite(x):
            raise _Unusable(f"region {i} bbox_2d must hold 4 finite numbers, got {bbox!r:.80}")
        out.append(x)
    return out


def _point(value) -> tuple[float, float] | None:
    if not isinstance(value, list) or len(value) != 2:
        return None
    try:
        p = tuple(float(v) for v in value if not isinstance(v, bool))
    except (TypeError, ValueError, OverflowError):
        return None
    return p if len(p) == 2 and all(math.isfinite(v) for v in p) else None


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at character {e.pos} of the block"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return f"{e}"[:120]
