"""Planner rewards for GRPO (replan-spec §5.4, §5.5): pure functions of strings and numbers, no I/O.

Stage 1, the editing (format) score of one reply. The reply is first normalised (every whitespace run next to ``<``,
``>`` or ``/`` is removed, inside text and JSON too; for scoring only), then::

    F  = 1 if the stripped reply is exactly <think>…</think><gen_image>…</gen_image>[<region>…</region>], else 0
         (the region block is required when a <region>…</region> pair exists anywhere)
    Q  = ramp(|think|, 0→50, .25) − .25·[|think| > 512] − 20·[think is a template placeholder]
       + ramp(|gen_image|, 0→20, .25) − .25·[|gen_image| > 512] − 20·[gen_image is a placeholder or empty]
       + .25 if a non-empty region block is a valid region list, −.25 if it is not                  (max .75)
    Rg = 0 without region content; −.5 for an invalid list; else .5 + .2·[1 ≤ n ≤ 5]
         − 1 per placeholder hint − 1 per placeholder box + .2·[n > 0 and no placeholder hint]    (max .9)
    overall = .5·F + .3·Q + .2·Rg                                                                (max .905)

A valid region list is a JSON list of objects, each with ``bbox_2d`` (4 finite numbers) and ``hint`` (a string).
Lengths are characters of the stripped block contents. Copying one template placeholder costs 20·0.3 = 6. (Official:
any ``int``/``float`` is a number, so NaN, infinities and booleans earn the format reward; here they make the list
invalid, on purpose: such a plan cannot be executed.)

Stage 2, the planning score of an executed plan (judge scores read as official: a numeric score counts as given,
off its scale too, e.g. an effect 4 gives E = 1; ``off_scale`` counts them)::

    T, E, C = 1[target ≥ 4], 1[effect ≥ 4], 1[consistency ≥ 4]   (a missing score counts as 0)
    planning = (T + E + C·E) / 3                                  (consistency counts only when the effect succeeded)
    overall  = planning + 0.2·editing overall                     (max 1.181)

``should_execute`` is the official gate: F = 1 and Rg ≥ 0.7 (a valid list of regions, none copying a template
placeholder; 6 or more regions still reach 0.7). Two cases the official edit server fails on, so that their planning
score is 0 there, are not sent at all (same score, no wasted edit): more than ``MAX_REGIONS`` = 6 regions (its
31-group attention limit) and a box with x2 ≤ x1 or y2 ≤ y1. A box partly or entirely outside the image is executed,
as official (the edit server clamps it). Every other reply gets planning 0 and keeps its editing part. Every function
here returns the same keys for every input and never raises on bad input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from replan.eval.judge_prompts import JudgeParseError, is_off_scale, parse_judgement
from replan.parse_official import find_block

BONUS_REGIONS = 5  # Rg gets +0.2 for 1 to 5 regions
MAX_REGIONS = 6  # the most regions the official edit server executes (31 attention groups for FLUX.1 Kontext)
GATE_REGION = 0.7  # official gate: F = 1 and Rg >= 0.7
FORMAT_WEIGHT, QUALITY_WEIGHT, REGION_WEIGHT = 0.5, 0.3, 0.2
EDITING_WEIGHT = 0.2  # weight of the editing score in the stage-2 reward
SHARP = 4  # stage-2 threshold on the judge scores
PLACEHOLDER_PENALTY = 20.0
LENGTH_CAP = 512

# The prompt template's example strings (replan/planner/prompt.txt) and two older wordings of the think placeholder.
THINK_PLACEHOLDERS = frozenset({
    "Reasoning process",
    "Your reasoning process to understand the user's instruction based on the image. Decompose the instruction into "
    "global and local edits, identifying regions for editing.",
    "First, state the user's main goal based on their instruction. Then, detail the global and local edits required "
    "to achieve this goal, explaining your reasoning for each.",
})
GEN_PLACEHOLDERS = frozenset({"Detailed prompt for the image generator", "Global edit instruction", ""})
HINT_PLACEHOLDERS = frozenset({"how to edit for this region", "", "change the color of this one apple to blue",
                               "keep this one apple unchanged"})
BOX_PLACEHOLDERS = frozenset({(10.0, 150.0, 150.0, 210.0), (150.0, 50.0, 200.0, 150.0)})

JUDGE_DIMENSIONS = ("target", "effect", "consistency")
EVAL_DIMENSION = {"target": "target_following", "effect": "effect", "consistency": "consistency"}
EDITING_KEYS = ("overall", "format", "quality", "region", "n_regions", "valid", "executable")
PLANNING_KEYS = ("overall", "planning", "editing", "format", "quality", "region", "n_regions", "valid", "executable",
                 "executed", "target", "effect", "consistency", "target_score", "effect_score", "consistency_score",
                 "off_scale", "edit_failed", "judge_failed", "missing_input")

_WHITESPACE = re.compile(r"\s+")
_TIGHT = "<>/"


# ------------------------------------------------------------------------------------------------------ stage 1
def normalise(text: str) -> str:
    """Remove every whitespace run that touches ``<``, ``>`` or ``/`` (official ``re.sub(r"\\s*(<|>|/)\\s*", r"\\1",
    text)``, in linear time: that regex is quadratic on long whitespace runs)."""
    out, pos, n = [], 0, len(text)
    for m in _WHITESPACE.finditer(text):
        start, end = m.span()
        if (start > 0 and text[start - 1] in _TIGHT) or (end < n and text[end] in _TIGHT):
            out.append(text[pos:start])
            pos = end
    out.append(text[pos:])
    return "".join(out)


def _tag_sequence(text: str, tags: Sequence[str]) -> bool:
    """``text`` is exactly ``<t1>…</t1><t2>…</t2>…`` with any bodies: the official fullmatch of
    ``<t1>.*?</t1>\\s*<t2>.*?</t2>…`` (DOTALL) on normalised text, where no whitespace can sit between tags; linear
    (the earliest junction of each pair always works if any does)."""
    if not text.startswith(f"<{tags[0]}>") or not text.endswith(f"</{tags[-1]}>"):
        return False
    pos = len(tags[0]) + 2
    for a, b in zip(tags, tags[1:]):
        joint = f"</{a}><{b}>"
        i = text.find(joint, pos)
        if i < 0:
            return False
        pos = i + len(joint)
    return pos <= len(text) - len(tags[-1]) - 3


def _block(text: str, tag: str) -> str | None:
    found = find_block(text, tag)  # the first <tag> and the first </tag> after it, as re.search("<tag>(.*?)</tag>")
    return None if found is None else found[0].strip()


def _ramp(x: float, end: float, value: float) -> float:
    return value if x >= end else (0.0 if x <= 0 else value * x / end)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _region_list(body: str) -> tuple[list | None, int, str]:
    """``(items or None, number of items, problem)`` for a region block's content."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, too many digits, nested too deeply
        return None, 0, "the region block is not valid JSON"
    if not isinstance(data, list):
        return None, 0, f"the region block holds a JSON {type(data).__name__}, not a list"
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or "bbox_2d" not in item or "hint" not in item:
            return None, 0, f"region {i} is not an object with bbox_2d and hint"
        box = item["bbox_2d"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            return None, 0, f"region {i} bbox_2d is not a list of 4 finite numbers"
        if not isinstance(item["hint"], str):
            return None, 0, f"region {i} hint is not a string"
    return data, len(data), ""


class _Analysis:
    """Everything the stage-1 score and the execution gate need from one reply."""

    def __init__(self, response):
        self.text = _as_text(response)
        self.format = self.quality = self.region = 0.0
        self.items, self.n_regions, self.has_region, self.problem = None, 0, False, "the response is not text"
        if self.text is None:
            return
        text = normalise(self.text).strip()
        self.has_region = find_block(text, "region") is not None
        self.format = float(_tag_sequence(text, ("think", "gen_image", "region") if self.has_region
                                          else ("think", "gen_image")))
        think, gen, region = _block(text, "think") or "", _block(text, "gen_image") or "", _block(text, "region")
        q = _ramp(len(think), 50, 0.25) - 0.25 * (len(think) > LENGTH_CAP)
        q -= PLACEHOLDER_PENALTY * (think in THINK_PLACEHOLDERS)
        q += _ramp(len(gen), 20, 0.25) - 0.25 * (len(gen) > LENGTH_CAP)
        q -= PLACEHOLDER_PENALTY * (gen in GEN_PLACEHOLDERS)
        self.problem = "the <region> block is missing or empty (a global edit only)"
        if region:  # an absent or empty block is "no region content": neither bonus nor penalty
            self.items, self.n_regions, self.problem = _region_list(region)
            q += 0.25 if self.items is not None else -0.25
            self.region = self._region_score()
        self.quality = q

    def _region_score(self) -> float:
        if self.items is None:
            return -0.5
        n, score, good_hints = len(self.items), 0.5, 0
        score += 0.2 * (1 <= n <= BONUS_REGIONS)
        for item in self.items:  # (the official 4-values check cannot fail on a valid list and is left out)
            if item["hint"] in HINT_PLACEHOLDERS:
                score -= 1.0
            else:
                good_hints += 1
            if tuple(float(v) for v in item["bbox_2d"]) in BOX_PLACEHOLDERS:
                score -= 1.0
        score += 0.2 * (n > 0 and good_hints == n)
        return min(score, 1.0)

    @property
    def overall(self) -> float:
        return FORMAT_WEIGHT * self.format + QUALITY_WEIGHT * self.quality + REGION_WEIGHT * self.region

    @property
    def valid(self) -> bool:
        return self.format == 1.0 and self.items is not None

    def gate(self) -> tuple[bool, str]:
        if self.text is None:
            return False, self.problem
        if self.format != 1.0:
            return False, "format: the reply is not exactly <think>…</think><gen_image>…</gen_image><region>…</region>"
        if self.items is None:
            return False, self.problem
        if not self.region >= GATE_REGION:
            if self.n_regions == 0:
                return False, "empty region list (a global edit only)"
            copied = next((i for i, item in enumerate(self.items, 1) if item["hint"] in HINT_PLACEHOLDERS
                           or tuple(float(v) for v in item["bbox_2d"]) in BOX_PLACEHOLDERS), None)
            why = f"region {copied} copies the template's example hint or box" if copied else "region score too low"
            return False, f"{why} (Rg {self.region:.2f} < {GATE_REGION})"
        if self.n_regions > MAX_REGIONS:
            return False, f"{self.n_regions} regions; the edit server runs at most {MAX_REGIONS}"
        for i, item in enumerate(self.items, 1):
            x1, y1, x2, y2 = (float(v) for v in item["bbox_2d"])
            if x2 <= x1 or y2 <= y1:
                return False, f"region {i} box {list(item['bbox_2d'])} has x2 <= x1 or y2 <= y1"
        return True, "ok"


def _as_text(response) -> str | None:
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", errors="replace")
    return None


def editing_score(response) -> dict:
    """Stage-1 score of one reply: ``overall, format, quality, region`` (the official terms), ``n_regions`` (items in
    a valid region list, else 0), ``valid`` (F = 1 and a valid region list, possibly empty) and ``executable``
    (``should_execute``). A ``str`` or ``bytes`` reply is always scored by the formula (text without tags scores
    −6); anything else scores 0 with valid False."""
    a = _Analysis(response)
    executable, _ = a.gate()
    return {"overall": a.overall, "format": a.format, "quality": a.quality, "region": a.region,
            "n_regions": a.n_regions, "valid": a.valid, "executable": executable}


def should_execute(response) -> tuple[bool, str]:
    """``(True, "ok")`` if the plan goes to the edit server, else ``(False, reason)``; see the module docstring."""
    return _Analysis(response).gate()


def stage1_rewards(responses: Sequence) -> list[dict]:
    """``editing_score`` for each reply."""
    return [editing_score(r) for r in responses]


# ------------------------------------------------------------------------------------------------------ stage 2
def parse_judge_score(text, dimension: str, score_parse: str = "official") -> int | float | None:
    """The score in a judge reply for ``dimension`` (target, effect, consistency, or the eval names), or None when
    the reply has no numeric score (``official``: any number counts as given) or, with ``strict``, none on the
    dimension's scale (the eval judges' parser, ``parse_judgement``)."""
    dimension = EVAL_DIMENSION.get(dimension, dimension)
    try:
        return parse_judgement(text if isinstance(text, str) else "", dimension, score_parse)[0]
    except (JudgeParseError, KeyError):
        return None


def _judge_value(score) -> float | None:
    return float(score) if _is_number(score) else None


def planning_score(target, effect, consistency, editing: dict, sharp: int = SHARP, *,
                   format_weight: float = EDITING_WEIGHT, executed: bool | None = None, edit_failed: bool = False,
                   judge_failed: bool = False, missing_input: bool = False) -> dict:
    """Stage-2 reward from three judge scores (None for a failed or skipped judge: that part is 0) and the reply's
    ``editing_score``. Keys: ``PLANNING_KEYS``. ``target/effect/consistency`` are T, E, C (0/1); ``*_score`` are the
    judge scores (0 when missing); ``off_scale`` counts the scores off their dimension's scale. ``sharp=0`` is the
    official unused variant: planning = mean(t, e, c·w)/5 with w = max(e − 3, 0)/5, and the raw scores in
    ``target/effect/consistency``."""
    base = {k: 0 for k in EDITING_KEYS} | {"valid": False, "executable": False}
    if isinstance(editing, dict):
        base |= {k: editing[k] for k in EDITING_KEYS if k in editing and isinstance(editing[k], (int, float))}
    editing_overall = float(base["overall"]) if _is_number(base["overall"]) else 0.0
    scores = [_judge_value(s) for s in (target, effect, consistency)]
    t, e, c = (0.0 if s is None else s for s in scores)
    try:
        if sharp:
            marks = [1.0 if s >= sharp else 0.0 for s in (t, e, c)]
            planning = (marks[0] + marks[1] + marks[2] * marks[1]) / 3.0
        else:
            weight = max(e - 3.0, 0.0) / 5.0 if scores[1] is not None else 0.0
            marks = [t, e, c]
            planning = (t + e + c * weight) / 3.0 / 5.0
        if not math.isfinite(planning):
            raise ValueError("planning score is not finite")
    except (TypeError, ValueError):  # as official: a failed planning part leaves the editing part only
        marks, planning = [0.0, 0.0, 0.0], 0.0
    if executed is None:
        executed = any(s is not None for s in scores)
    off_scale = sum(is_off_scale(s, EVAL_DIMENSION[d]) for s, d in zip(scores, JUDGE_DIMENSIONS))
    return {"overall": planning + format_weight * editing_overall, "planning": planning, "editing": editing_overall,
            **{k: base[k] for k in EDITING_KEYS if k != "overall"},
            "executed": bool(executed), "target": marks[0], "effect": marks[1], "consistency": marks[2],
            "target_score": t, "effect_score": e, "consistency_score": c, "off_scale": off_scale,
            "edit_failed": bool(edit_failed), "judge_failed": bool(judge_failed), "missing_input": bool(missing_input)}
