"""Parse planner output in the official RePlan grammar into a ``RegionPlan``.

Grammar (replan-spec §1.5)::

    <think>TEXT</think><gen_image>TEXT</gen_image><region>[{"bbox_2d": [x1,y1,x2,y2], "point_2d": [x,y], "hint": "..."}]</region>

Three modes (``mode=``; ``strict=True`` is the same as ``mode="strict"``):

* ``lenient`` (default): repairs what can be repaired (code fences, trailing commas, single quotes, a missing think
  block, a truncated region list, swapped corners), drops what cannot be used (zero-area boxes, boxes entirely
  outside the image, items without a box or hint) and records every repair in ``plan.repairs``.
* ``strict``: raises ``PlanParseError`` naming what is wrong and where.
* ``official``: reads the reply as the official code does, with no repairs (``replan.parse_official``); whatever the
  official code would not execute becomes a plain global edit.

In every mode a box is kept as the planner wrote it (mapped from ``planner_size`` when given), even when it sticks
out of the image: the editor expands the raw box and clamps it afterwards, as official. A reply without
``<region>`` is a plain global edit, as official. Whatever the input, the result is a plan or a
``PlanParseError``; never another exception. (One idea, the reply grammar read in three modes: one file.)
"""  # noqa: E501 (the grammar line is quoted verbatim)

from __future__ import annotations

import ast
import json
import math
import numbers
import re
from dataclasses import replace

from replan.coords import Size, box_area, clip_box, planner_to_original
from replan.parse_official import find_block, parse_official
from replan.plan import Region, RegionPlan, format_box

PARSE_MODES = ("lenient", "strict", "official")

_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_MAX_LITERAL_EVAL = 200_000  # characters; ast.literal_eval on huge inputs is slow and can exhaust the stack


class PlanParseError(ValueError):
    """The planner text does not follow the grammar (strict mode) or cannot be read at all."""

    def __init__(self, message: str, position: int | None = None):
        self.position = position
        super().__init__(message if position is None else f"{message} (at character {position})")


def parse_mode(mode: str | None = None, strict: bool = False) -> str:
    """The parse mode from ``mode`` and the older ``strict`` flag (``strict=True`` means ``"strict"``)."""
    if mode is None:
        return "strict" if strict else "lenient"
    if mode not in PARSE_MODES:
        raise ValueError(f"unknown parse mode {mode!r}; choose one of {', '.join(PARSE_MODES)}")
    if strict and mode != "strict":
        raise ValueError(f"strict=True (--strict_plan) contradicts parse mode {mode!r} (--parse); give one of them")
    return mode


def parse_plan(
    text: str | bytes,
    image_size: Size | None = None,
    *,
    mode: str | None = None,
    strict: bool = False,
    planner_size: Size | None = None,
) -> RegionPlan:
    """Parse planner text.

    Args:
        text: the planner's reply.
        image_size: (W, H) of the original image; lenient mode drops boxes entirely outside it, strict mode
            refuses them (official mode keeps them).
        mode: ``"lenient"`` (default), ``"strict"`` or ``"official"`` (see the module docstring).
        strict: the same as ``mode="strict"`` (kept for existing callers).
        planner_size: (W, H) of the frame the planner saw; boxes are mapped from it to ``image_size``.
    """
    mode = parse_mode(mode, strict)
    try:
        parser = _Parser(mode == "strict", image_size, planner_size)
        if mode == "official":
            plan = parse_official(parser.as_text(text), parser.image_size, parser.planner_size)
            return replace(plan, repairs=tuple(parser.repairs) + plan.repairs) if parser.repairs else plan
        return parser.run(text)
    except PlanParseError:
        raise
    except (RecursionError, MemoryError) as e:  # pathological inputs
        raise PlanParseError(f"planner text could not be parsed: {type(e).__name__}") from None


class _Parser:
    def __init__(self, strict: bool, image_size: Size | None, planner_size: Size | None):
        self.strict = strict
        self.image_size = _size(image_size, "image_size")
        self.planner_size = _size(planner_size, "planner_size")
        if self.planner_size and not self.image_size:
            raise PlanParseError("planner_size needs image_size: boxes are mapped from the planner frame to the image")
        self.repairs: list[str] = []

    def fail_or_repair(self, problem: str, repair: str, position: int | None = None) -> None:
        if self.strict:
            raise PlanParseError(problem, position)
        self.repairs.append(f"{problem}; {repair}")

    # ------------------------------------------------------------------------------------------------ top level
    def run(self, text) -> RegionPlan:
        text = self.as_text(text)
        raw = text
        if not self.strict:
            fenced = _FENCE.fullmatch(text.strip())
            if fenced and "<" in fenced.group(1):
                text = fenced.group(1)
                self.repairs.append("reply wrapped in a code fence; fence removed")
        reasoning, think_span = self._block(text, "think", required_before=("gen_image", "region"))
        global_prompt, gen_span = self._block(text, "gen_image", required_before=("region",))
        region_text, region_span = self._region_block(text)
        self._check_outside_text(text, [s for s in (think_span, gen_span, region_span) if s])
        regions = []
        if region_text is not None:  # JSON error positions are reported in the whole text, not in the block
            body_start = region_span[0] + len("<region>") + len(region_text) - len(region_text.lstrip())
            regions = self._regions(region_text, body_start)
        return RegionPlan(
            global_prompt=(global_prompt or "").strip(),
            regions=tuple(regions),
            reasoning=(reasoning or "").strip(),
            image_size=self.image_size,
            raw_text=raw,
            repairs=tuple(self.repairs),
        )

    def as_text(self, text) -> str:
        if isinstance(text, (bytes, bytearray)):
            try:
                return bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                if self.strict:
                    raise PlanParseError(f"planner text is not valid UTF-8 ({e.reason})", e.start) from None
                self.repairs.append("planner text is not valid UTF-8; undecodable bytes replaced")
                return bytes(text).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise PlanParseError(f"planner text must be a string, got {type(text).__name__}")
        return text

    def _block(self, text: str, tag: str, required_before: tuple[str, ...]) -> tuple[str | None, tuple | None]:
        m = find_block(text, tag)
        if m:
            return m
        start = text.find(f"<{tag}>")
        if start >= 0:  # opened, never closed: read up to the next block
            body_start = start + len(tag) + 2
            ends = [i for i in (text.find(f"<{t}>", body_start) for t in required_before) if i >= 0]
            end = min(ends) if ends else len(text)
            self.fail_or_repair(f"<{tag}> is never closed", f"read up to character {end}", start)
            return text[body_start:end], (start, end)
        self.fail_or_repair(f"missing <{tag}>…</{tag}> block", "treated as empty")
        return None, None

    def _region_block(self, text: str) -> tuple[str | None, tuple | None]:
        m = find_block(text, "region")
        if m:
            return m
        start = text.find("<region>")
        if start >= 0:
            self.fail_or_repair("<region> is never closed (truncated reply?)", "read to the end", start)
            return text[start + len("<region>") :], (start, len(text))
        self.fail_or_repair("missing <region>…</region> block", "plan has no regions (global edit only)")
        return None, None

    def _check_outside_text(self, text: str, spans: list[tuple[int, int]]) -> None:
        pos = 0
        for start, end in sorted(spans):
            if text[pos:start].strip():
                self.fail_or_repair("text outside the tags", "ignored", pos)
                return
            pos = max(pos, end)
        if text[pos:].strip():
            self.fail_or_repair("text outside the tags", "ignored", pos)

    # ------------------------------------------------------------------------------------------------ regions
    def _regions(self, body: str, offset: int = 0) -> list[Region]:
        items = self._json_list(body.strip(), offset)
        regions: list[Region] = []
        for i, item in enumerate(items, 1):
            region = self._region(i, item)
            if region is not None:
                regions.append(region)
        return regions

    def _json_list(self, body: str, offset: int = 0) -> list:
        if not self.strict:
            fenced = _FENCE.search(body)
            if fenced:
                body = fenced.group(1).strip()
                self.repairs.append("region list wrapped in a code fence; fence removed")
        if body == "":
            self.fail_or_repair("<region> block is empty", "plan has no regions")
            return []
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, nesting too deep
            msg, pos = _json_error(e)
            if self.strict:
                at = None if pos is None else offset + pos
                raise PlanParseError(f"region list is not valid JSON: {msg}", at) from None
            data = self._repair_json(body)
            if data is None:
                self.repairs.append(f"region list is not valid JSON ({msg}); plan has no regions")
                return []
        if isinstance(data, dict):
            self.fail_or_repair("region list is a single object, not a list", "wrapped in a list")
            data = [data]
        if not isinstance(data, list):
            self.fail_or_repair(f"region block holds a {type(data).__name__}, not a list", "plan has no regions")
            return []
        return data

    def _repair_json(self, body: str):
        no_commas = _TRAILING_COMMA.sub(r"\1", body)
        try:
            data = json.loads(no_commas)
            self.repairs.append("trailing commas in the region list removed")
            return data
        except (ValueError, RecursionError):
            pass
        if len(body) <= _MAX_LITERAL_EVAL:
            try:
                data = ast.literal_eval(no_commas)
                self.repairs.append("region list written as a Python literal (single quotes); read as such")
                return data
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass
        objects = _complete_objects(no_commas)
        if objects:
            self.repairs.append(f"region list is truncated or malformed; kept {len(objects)} complete object(s)")
            return objects
        return None

    def _region(self, i: int, item) -> Region | None:
        if not isinstance(item, dict):
            self.fail_or_repair(f"region {i} is a {type(item).__name__}, not an object", "skipped")
            return None
        bbox = item.get("bbox_2d")
        if bbox is None and "bbox" in item:
            self.fail_or_repair(f"region {i} uses the key 'bbox' instead of 'bbox_2d'", "accepted")
            bbox = item["bbox"]
        if bbox is None:
            self.fail_or_repair(f"region {i} has no bbox_2d", "skipped")
            return None
        box = self._numbers(bbox, 4, f"region {i} bbox_2d")
        hint = item.get("hint")
        if not isinstance(hint, str) or not hint.strip():
            self.fail_or_repair(f"region {i} has no hint (or an empty one)", "skipped")
            return None
        if box is None:
            return None
        point = None
        if item.get("point_2d") is not None:
            point = self._numbers(item["point_2d"], 2, f"region {i} point_2d")
        if self.planner_size:
            box = list(planner_to_original(box, self.planner_size, self.image_size))
            if point is not None:
                point = planner_to_original([*point, *point], self.planner_size, self.image_size)[:2]
        x1, y1, x2, y2 = box
        if x1 > x2 or y1 > y2:
            self.fail_or_repair(f"region {i} box {format_box(box)} has swapped corners", "corners swapped back")
            box = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        if self.image_size and box_area(clip_box(box, self.image_size)) <= 0 < box_area(box):
            w, h = self.image_size  # partly outside is fine: the editor expands the raw box, then clamps
            self.fail_or_repair(f"region {i} box {format_box(box)} lies outside the {w}x{h} image", "dropped")
            return None
        if box_area(box) <= 0:
            self.fail_or_repair(f"region {i} box {format_box(box)} has zero area", "dropped")
            return None
        return Region(bbox=tuple(box), hint=hint.strip(), point=tuple(point) if point is not None else None)

    def _numbers(self, values, n: int, what: str) -> list[float] | None:
        if isinstance(values, list) and len(values) == 2 and n == 4 and all(isinstance(v, list) for v in values):
            self.fail_or_repair(f"{what} is a pair of points", "flattened")
            values = values[0] + values[1]
        if not isinstance(values, list) or len(values) != n:
            self.fail_or_repair(f"{what} must be a list of {n} numbers, got {values!r:.80}", "skipped")
            return None
        out = []
        for v in values:
            if isinstance(v, str) and not self.strict:
                try:
                    v = float(v)
                    self.repairs.append(f"{what}: number written as a string; converted")
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                self.fail_or_repair(f"{what} must hold finite numbers, got {values!r:.80}", "skipped")
                return None
            out.append(float(v))
        return out


def _complete_objects(text: str) -> list:
    """Collect every complete top-level ``{…}`` JSON object in ``text`` (salvages a truncated list)."""
    objects, depth, start, in_str, escape = [], 0, None, False, False
    for i, ch in enumerate(text):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0 and start is not None:
                try:
                    objects.append(json.loads(text[start : i + 1]))
                except (ValueError, RecursionError):
                    pass
    return objects


def _json_error(e: Exception) -> tuple[str, int | None]:
    if isinstance(e, json.JSONDecodeError):
        return e.msg, e.pos
    if isinstance(e, RecursionError):
        return "nested too deeply", None
    return f"{e}"[:120], None  # e.g. an integer with more digits than Python converts


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _size(value, name: str) -> tuple | None:
    """Validate an optional (W, H) argument; a bad one is a ``PlanParseError`` like every other failure."""
    if value is None:
        return None
    try:
        w, h = value
        ok = all(not isinstance(v, bool) and isinstance(v, numbers.Real) and _finite(v) and v > 0 for v in (w, h))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PlanParseError(f"{name} must be (W, H) with two positive numbers, got {value!r:.80}")
    return (w, h)
