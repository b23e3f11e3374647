"""Stage-1 editing score and stage-2 planning score (replan-spec §5.4, §5.5): hand-computed values, the official
regexes as oracles for normalisation and format, the execution gate, judge-reply parsing, robustness."""

from __future__ import annotations

import json
import random
import re
from importlib import resources

import pytest

from replan.train.rewards import (
    BOX_PLACEHOLDERS,
    EDITING_KEYS,
    GEN_PLACEHOLDERS,
    HINT_PLACEHOLDERS,
    PLANNING_KEYS,
    THINK_PLACEHOLDERS,
    _tag_sequence,
    editing_score,
    normalise,
    parse_judge_score,
    planning_score,
    should_execute,
    stage1_rewards,
)

THINK = "The red apple on the left must turn blue; only that apple changes, the rest of the image stays as it is."
GEN = "keep remaining part of image unchanged."  # 39 characters: the full 0.25
assert len(THINK) >= 50 and len(GEN) >= 20


def region(i: int = 0, box=None, hint=None) -> dict:
    x = 10 + 40 * i
    return {"bbox_2d": box or [x, 20, x + 30, 90], "point_2d": [x + 15, 55], "hint": hint or f"paint apple {i} blue"}


def reply(items, think: str = THINK, gen: str = GEN) -> str:
    body = items if isinstance(items, str) else json.dumps(items)
    return f"<think>{think}</think><gen_image>{gen}</gen_image><region>{body}</region>"


def regions(n: int) -> list[dict]:
    return [region(i) for i in range(n)]


GOOD = 0.5 + 0.3 * 0.75 + 0.2 * 0.9  # 0.905, the maximum
PROMPT_EXAMPLE = next(line for line in resources.files("replan.planner").joinpath("prompt.txt").read_text().splitlines()
                      if line.startswith("<think>"))

# name: (response, format, quality, region, overall, n_regions, valid, executable)
CASES = {
    "valid 1 region": (reply(regions(1)), 1, 0.75, 0.9, GOOD, 1, True, True),
    "valid 3 regions": (reply(regions(3)), 1, 0.75, 0.9, GOOD, 3, True, True),
    "valid 5 regions": (reply(regions(5)), 1, 0.75, 0.9, GOOD, 5, True, True),
    "0 regions": (reply([]), 1, 0.75, 0.5, 0.5 + 0.225 + 0.1, 0, True, False),
    # 6+ regions miss the 1-5 bonus but reach Rg = .5 + .2 = .7: the official gate executes them; the official edit
    # server runs at most 6 (31 attention groups), so 7+ would score 0 there and are not sent
    "6 regions": (reply(regions(6)), 1, 0.75, 0.7, 0.5 + 0.225 + 0.14, 6, True, True),
    "7 regions": (reply(regions(7)), 1, 0.75, 0.7, 0.5 + 0.225 + 0.14, 7, True, False),
    "9 regions": (reply(regions(9)), 1, 0.75, 0.7, 0.5 + 0.225 + 0.14, 9, True, False),
    # think 17 chars: .085 − 20; region +.25; gen 23 chars: .25 − 20; Rg .5 + .2 − 2 hints − 2 boxes
    "template example copied": (PROMPT_EXAMPLE, 1, -39.415, -3.3, 0.5 + 0.3 * -39.415 + 0.2 * -3.3, 2, True, False),
    "placeholder think": (reply(regions(1), think="Reasoning process"), 1, -19.415, 0.9,
                          0.5 + 0.3 * -19.415 + 0.18, 1, True, True),
    "placeholder gen_image": (reply(regions(1), gen="Global edit instruction"), 1, -19.25, 0.9,
                              0.5 + 0.3 * -19.25 + 0.18, 1, True, True),
    "empty gen_image": (reply(regions(1), gen=""), 1, -19.5, 0.9, 0.5 + 0.3 * -19.5 + 0.18, 1, True, True),
    "placeholder hint": (reply([region(0, hint="keep this one apple unchanged")]), 1, 0.75, -0.3,
                         0.5 + 0.225 - 0.06, 1, True, False),
    "placeholder box": (reply([region(0, box=[10, 150, 150, 210])]), 1, 0.75, -0.1, 0.5 + 0.225 - 0.02, 1, True, False),
    "malformed json": (reply('[{"bbox_2d": [1, 2, 30, 40], "hint": "x"'), 1, 0.25, -0.5, 0.5 + 0.075 - 0.1, 0, False,
                       False),
    "bbox with 3 numbers": (reply([{"bbox_2d": [1, 2, 3], "hint": "x"}]), 1, 0.25, -0.5, 0.475, 0, False, False),
    "hint not a string": (reply([{"bbox_2d": [1, 2, 3, 4], "hint": 5}]), 1, 0.25, -0.5, 0.475, 0, False, False),
    "NaN coordinate": (reply('[{"bbox_2d": [NaN, 2, 30, 40], "hint": "x"}]'), 1, 0.25, -0.5, 0.475, 0, False, False),
    "bool coordinate": (reply('[{"bbox_2d": [true, 2, 30, 40], "hint": "x"}]'), 1, 0.25, -0.5, 0.475, 0, False, False),
    "region is an object": (reply(region(0)), 1, 0.25, -0.5, 0.475, 0, False, False),
    "empty region block": (reply("  "), 1, 0.5, 0.0, 0.5 + 0.15, 0, False, False),
    "no region block": (f"<think>{THINK}</think><gen_image>{GEN}</gen_image>", 1, 0.5, 0.0, 0.65, 0, False, False),
    "empty": ("", 0, -20, 0, -6.0, 0, False, False),
    "missing think": (f"<gen_image>{GEN}</gen_image><region>{json.dumps(regions(1))}</region>", 0, 0.5, 0.9,
                      0.15 + 0.18, 1, False, False),
    "text before the tags": ("Sure! " + reply(regions(1)), 0, 0.75, 0.9, 0.225 + 0.18, 1, False, False),
    "text after the tags": (reply(regions(1)) + " done", 0, 0.75, 0.9, 0.405, 1, False, False),
    "tags out of order": (f"<gen_image>{GEN}</gen_image><think>{THINK}</think><region>[]</region>", 0, 0.75, 0.5,
                          0.225 + 0.1, 0, False, False),
    # the official edit server fails on these (planning 0), so they are not sent
    "swapped box": (reply([region(0, box=[300, 200, 100, 50])]), 1, 0.75, 0.9, GOOD, 1, True, False),
    "zero-width box": (reply([region(0, box=[100, 20, 100, 90])]), 1, 0.75, 0.9, GOOD, 1, True, False),
    # executed as official (Rg counts it as a good hint; the edit server's parser leaves the region out)
    "whitespace-only hint": (reply([region(0, hint="   ")]), 1, 0.75, 0.9, GOOD, 1, True, True),
    # entirely outside a 640x480 image, and partly: executed as official, which clamps after expanding
    "box outside the image": (reply([region(0), region(1, box=[700, 500, 800, 600])]), 1, 0.75, 0.9, GOOD, 2, True,
                              True),
    "box partly outside": (reply([region(0, box=[600, 400, 700, 500])]), 1, 0.75, 0.9, GOOD, 1, True, True),
    "long think and gen_image": (reply(regions(1), think="a" * 600, gen="b" * 600), 1, 0.25, 0.9, 0.755, 1, True,
                                 True),
    "think at the cap": (reply(regions(1), think="a" * 512), 1, 0.75, 0.9, GOOD, 1, True, True),
    "short think and gen_image": (reply(regions(1), think="a" * 10, gen="b" * 5), 1, 0.05 + 0.25 + 0.0625, 0.9,
                                  0.5 + 0.3 * 0.3625 + 0.18, 1, True, True),
    "spaces around tags": ("\n < think > " + THINK + " </ think >\n\n< gen_image >" + GEN + "</gen_image >\n<region>"
                           + json.dumps(regions(2), indent=2) + "</region>\n", 1, 0.75, 0.9, GOOD, 2, True, True),
    "spaces inside the region tag": (reply(regions(1)).replace("<region>", "< region >"), 1, 0.75, 0.9, GOOD, 1, True,
                                     True),  # scored and executed as official: the server then sees no regions
    "garbage bytes": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage", 0, -20, 0, -6.0, 0, False, False),
    "utf-8 bytes": (reply(regions(1)).encode(), 1, 0.75, 0.9, GOOD, 1, True, True),
    "none": (None, 0, 0, 0, 0.0, 0, False, False),
    "a number": (12345, 0, 0, 0, 0.0, 0, False, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_editing_score_hand_computed(name):
    response, f, q, rg, overall, n, valid, executable = CASES[name]
    s = editing_score(response)
    assert tuple(s) == EDITING_KEYS
    assert s["format"] == f and s["quality"] == pytest.approx(q) and s["region"] == pytest.approx(rg)
    assert s["overall"] == pytest.approx(overall) and s["n_regions"] == n
    assert s["valid"] is valid and s["executable"] is executable
    assert s["overall"] == pytest.approx(0.5 * s["format"] + 0.3 * s["quality"] + 0.2 * s["region"])
    ok, reason = should_execute(response)
    assert ok is executable and (reason == "ok") is ok and reason
    # the official gate is F = 1 and Rg >= 0.7; it differs only where the official server fails (planning 0 there)
    official_gate = s["format"] == 1.0 and s["region"] >= 0.7
    server_fails = name in ("7 regions", "9 regions", "swapped box", "zero-width box")
    assert executable is (official_gate and not server_fails)


def test_maximum_and_placeholder_costs():
    assert editing_score(reply(regions(2)))["overall"] == pytest.approx(0.905)
    base = editing_score(reply(regions(1)))["overall"]
    assert base - editing_score(reply(regions(1), think="Reasoning process"))["overall"] == pytest.approx(6.0 + 0.3 * (
        0.25 - 0.085))


def test_every_template_placeholder_is_penalised():
    """The example line of our planner prompt: its think, gen_image, hints and boxes are all in the penalty lists."""
    think = re.search(r"<think>(.*?)</think>", PROMPT_EXAMPLE).group(1)
    gen = re.search(r"<gen_image>(.*?)</gen_image>", PROMPT_EXAMPLE).group(1)
    items = json.loads(re.search(r"<region>(.*?)</region>", PROMPT_EXAMPLE).group(1))
    assert think in THINK_PLACEHOLDERS and gen in GEN_PLACEHOLDERS
    for item in items:
        assert item["hint"] in HINT_PLACEHOLDERS and tuple(map(float, item["bbox_2d"])) in BOX_PLACEHOLDERS


def test_gate_reasons_and_the_official_gate():
    assert should_execute(reply(regions(6))) == (True, "ok")
    assert should_execute(reply(regions(7)))[1] == "7 regions; the edit server runs at most 6"
    assert "empty region list" in should_execute(reply([]))[1]
    assert "x2 <= x1" in should_execute(reply([region(0, box=[300, 200, 100, 50])]))[1]
    reason = should_execute(reply([region(0), region(1, hint="how to edit for this region")]))[1]
    assert reason == "region 2 copies the template's example hint or box (Rg -0.30 < 0.7)"  # .5 + .2 - 1
    assert should_execute("nonsense")[1].startswith("format")
    assert "not text" in should_execute(None)[1]
    # everything executed passes the official gate F = 1 and Rg >= 0.7
    for response, *_ in CASES.values():
        s = editing_score(response)
        if s["executable"]:
            assert s["format"] == 1.0 and s["region"] >= 0.7


def test_batch_wrapper():
    responses = [c[0] for c in CASES.values()]
    assert stage1_rewards(responses) == [editing_score(r) for r in responses]
    assert stage1_rewards([]) == []


# ------------------------------------------------------------------------------------------ official regexes as oracles
def official_normalise(text: str) -> str:
    return re.sub(r"\s*(<|>|/)\s*", r"\1", text)


def official_format(text: str) -> float:
    has_region = bool(re.search(r"<region>.*?</region>", text, re.DOTALL))
    tail = r"\s*<region>.*?</region>" if has_region else ""
    return 1.0 if re.fullmatch(r"<think>.*?</think>\s*<gen_image>.*?</gen_image>" + tail, text.strip(), re.DOTALL) \
        else 0.0


TOKENS = ["<think>", "</think>", "<gen_image>", "</gen_image>", "<region>", "</region>", "<", ">", "/", " ", "\n",
          "\t", "  ", "a", "b c", "[]", "\u00a0", "\u2003", "< think >", "</ region >"]


def test_normalise_and_format_match_the_official_regexes():
    rng = random.Random(0)
    for _ in range(4000):
        text = "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 14)))
        norm = normalise(text)
        assert norm == official_normalise(text), repr(text)
        stripped = norm.strip()
        has_region = bool(re.search(r"<region>.*?</region>", stripped, re.DOTALL))
        ours = _tag_sequence(stripped, ("think", "gen_image", "region") if has_region else ("think", "gen_image"))
        assert float(ours) == official_format(norm), repr(text)
    for response, *_ in CASES.values():
        if isinstance(response, str):
            assert editing_score(response)["format"] == official_format(official_normalise(response))


@pytest.mark.parametrize("text", [
    " " * 200_000 + "x",
    "<think>" * 50_000,
    "<think></think><gen_image>" * 20_000,
    "<think>a</think><gen_image>b</gen_image><region>" + "[" * 100_000 + "</region>",
    "<think>a</think><gen_image>b</gen_image><region>[" + '{"bbox_2d": [1, 2, 3, 4], "hint": "h"},' * 20_000
    + "]</region>",
    "\x00\ud800" * 10_000,
])
def test_pathological_replies_are_safe(text):  # their speed: benchmark/parse_worst_case.py
    s = editing_score(text)
    assert tuple(s) == EDITING_KEYS and s["executable"] is False


# ------------------------------------------------------------------------------------------ stage 2
@pytest.mark.parametrize(("text", "dimension", "score"), [
    ('{"reasoning": "ok", "target_score": 5}', "target", 5),
    ('```json\n{"reasoning": "meh", "effect_score": 3}\n```', "effect", 3),
    ("5", "consistency", 5),
    ("consistency_score: 1", "consistency", 1),
    ('{"effect_score": 4}', "effect", 4),  # off the 5|3|1 scale: used as given, as official
    ('{"target_score": 3}', "target", 3),  # off the 5|1 scale
    ('{"target_score": 5}', "target_following", 5),  # eval names work too
    ("I cannot judge this.", "effect", None),
    ("", "effect", None),
    (None, "effect", None),
    ("5", "quality_of_life", None),
])
def test_parse_judge_score(text, dimension, score):
    assert parse_judge_score(text, dimension) == score
    scale = {"target": (1, 5), "effect": (1, 3, 5), "consistency": (1, 3, 5)}.get(dimension, (1, 5))
    assert parse_judge_score(text, dimension, "strict") == (score if score in scale else None)


EDIT = editing_score(reply(regions(1)))  # overall .905


@pytest.mark.parametrize(("t", "e", "c", "marks", "planning"), [
    (5, 5, 5, (1, 1, 1), 1.0),
    (5, 5, 3, (1, 1, 0), 2 / 3),
    (5, 5, 1, (1, 1, 0), 2 / 3),
    (5, 3, 5, (1, 0, 1), 1 / 3),  # consistency counts only when the effect succeeded
    (1, 5, 5, (0, 1, 1), 2 / 3),
    (1, 1, 1, (0, 0, 0), 0.0),
    (None, 5, 5, (0, 1, 1), 2 / 3),  # a failed judge call is 0
    (5, None, 5, (1, 0, 1), 1 / 3),
    (None, None, None, (0, 0, 0), 0.0),
])
def test_planning_score_hand_computed(t, e, c, marks, planning):
    s = planning_score(t, e, c, EDIT)
    assert tuple(s) == PLANNING_KEYS
    assert (s["target"], s["effect"], s["consistency"]) == marks
    assert s["planning"] == pytest.approx(planning)
    assert s["overall"] == pytest.approx(planning + 0.2 * 0.905)
    assert s["editing"] == pytest.approx(0.905) and s["format"] == 1.0 and s["n_regions"] == 1
    assert (s["target_score"], s["effect_score"], s["consistency_score"]) == tuple(0 if v is None else v
                                                                                  for v in (t, e, c))
    assert s["executed"] is (any(v is not None for v in (t, e, c))) and s["off_scale"] == 0


@pytest.mark.parametrize(("t", "e", "c", "marks", "planning", "off"), [
    (5, 4, 5, (1, 1, 1), 1.0, 1),  # effect 4 (off 5|3|1) counts 4 >= 4: E = 1, and C counts
    (5, 2, 5, (1, 0, 1), 1 / 3, 1),  # effect 2: E = 0, so C does not count
    (3, 5, 5, (0, 1, 1), 2 / 3, 1),  # target 3 (off 5|1) < 4
    (7, 7, 4, (1, 1, 1), 1.0, 3),  # 7s and a consistency 4 all clear the threshold
    (0, 4, 0, (0, 1, 0), 1 / 3, 3),
])
def test_planning_score_with_off_scale_judge_scores_hand_computed(t, e, c, marks, planning, off):
    s = planning_score(t, e, c, EDIT)
    assert (s["target"], s["effect"], s["consistency"]) == marks and s["off_scale"] == off
    assert s["planning"] == pytest.approx(planning) and s["overall"] == pytest.approx(planning + 0.2 * 0.905)
    assert (s["target_score"], s["effect_score"], s["consistency_score"]) == (t, e, c)


def test_planning_score_variants_and_bad_inputs():
    assert planning_score(5, 5, 5, EDIT)["overall"] == pytest.approx(1.181)
    unsharp = planning_score(5, 5, 5, EDIT, sharp=0)
    assert unsharp["planning"] == pytest.approx((5 + 5 + 5 * 0.4) / 3 / 5)
    assert planning_score(5, None, 5, EDIT, sharp=0)["planning"] == pytest.approx(5 / 15)
    garbage = editing_score("garbage")
    assert planning_score(None, None, None, garbage, executed=False)["overall"] == pytest.approx(-1.2)
    for editing in (None, {}, {"overall": float("nan")}, {"overall": "x"}, 7):
        s = planning_score(5, 5, 5, editing)
        assert tuple(s) == PLANNING_KEYS and s["overall"] == pytest.approx(1.0) and s["editing"] == 0.0
    for bad in (float("nan"), "5", True, [5]):
        s = planning_score(bad, 5, 5, EDIT)
        assert s["target"] == 0 and s["target_score"] == 0
    flags = planning_score(None, None, None, EDIT, executed=True, edit_failed=True, missing_input=False)
    assert flags["executed"] and flags["edit_failed"] and not flags["judge_failed"] and not flags["missing_input"]
    assert planning_score(5, 5, 5, EDIT, format_weight=0.0)["overall"] == 1.0
