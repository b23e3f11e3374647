"""parse_plan(mode="official"): the reply read exactly as the official code reads it, no repairs.

Each expectation below is what the official ``region_edit_with_attention`` does with the reply (replan-spec §1.6):
``json.loads`` of the first ``<region>…</region>`` (stripped), items without a truthy ``bbox_2d`` or ``hint`` skipped,
``expand_bbox`` raising on a box that is not 4 numbers or has ``x2 <= x1``/``y2 <= y1``. Where the official code
raises, replan runs a plain global edit and says why.
"""

from __future__ import annotations

import pytest

from replan.parse import PARSE_MODES, PlanParseError, parse_mode, parse_plan
from replan.plan import RegionPlan

HEAD = "<think>t</think><gen_image>g</gen_image>"
A = '{"bbox_2d": [10, 20, 30, 40], "hint": "a"}'
BOX_A = (10.0, 20.0, 30.0, 40.0)
OFFICIAL = (
    '<think>Reasoning process</think><gen_image>Global edit instruction</gen_image><region>[{"bbox_2d": '
    '[10,150,150,210], "point_2d": [30,175], "hint": "change the color of this one apple to blue"}, {"bbox_2d": '
    '[150,50,200,150], "point_2d": [175,75], "hint": "keep this one apple unchanged"}]</region>'
)


def reply(body: str, gen: str = "g") -> str:
    return f"<think>t</think><gen_image>{gen}</gen_image><region>{body}</region>"


def official(text, image_size=(200, 100), **kwargs) -> RegionPlan:
    return parse_plan(text, image_size, mode="official", **kwargs)


def pairs(plan: RegionPlan) -> list[tuple]:
    return [(r.bbox, r.hint) for r in plan.regions]


def test_the_official_example_parses_like_strict_mode():
    plan = official(OFFICIAL, None)
    assert plan == parse_plan(OFFICIAL, strict=True)
    assert plan.global_prompt == "Global edit instruction" and plan.reasoning == "Reasoning process"
    assert plan.regions[0].point == (30.0, 175.0) and plan.repairs == ()


@pytest.mark.parametrize("text", [
    "```xml\n" + OFFICIAL + "\n```",  # a fence around the reply: the tags are still found
    "Sure! " + OFFICIAL + " Hope this helps.",  # text outside the tags is ignored
    OFFICIAL.replace("<think>Reasoning process</think>", ""),  # no think block
    OFFICIAL.replace("</think>", ""),  # an unclosed think block
    OFFICIAL.replace("<region>", "<region>\n  ").replace("</region>", "\n</region>"),  # whitespace in the block
], ids=["fence-around-reply", "text-outside", "no-think", "unclosed-think", "whitespace"])
def test_what_the_official_code_reads_without_complaint(text):
    plan = official(text, None)
    assert pairs(plan) == pairs(parse_plan(OFFICIAL, strict=True)) and plan.repairs == ()
    assert plan.global_prompt == "Global edit instruction"


FALLBACK = [  # (id, region block, why): the official code raises on these; replan runs a plain global edit
    ("fence-in-block", "```json\n[" + A + "]\n```", "not valid JSON"),
    ("trailing-comma", "[" + A + ",]", "not valid JSON"),
    ("single-quotes", "[{'bbox_2d': [10, 20, 30, 40], 'hint': 'a'}]", "not valid JSON"),
    ("empty-block", "  ", "not valid JSON"),
    ("swapped-corners", '[{"bbox_2d": [30, 40, 10, 20], "hint": "s"}, ' + A + "]", "x2 <= x1 or y2 <= y1"),
    ("zero-width", '[{"bbox_2d": [10, 10, 10, 50], "hint": "z"}, ' + A + "]", "x2 <= x1 or y2 <= y1"),
    ("three-numbers", '[{"bbox_2d": [1, 2, 3], "hint": "h"}, ' + A + "]", "list of 4 numbers"),
    ("pair-of-points", '[{"bbox_2d": [[10, 20], [30, 40]], "hint": "h"}]', "list of 4 numbers"),
    ("nan", '[{"bbox_2d": [NaN, 2, 3, 4], "hint": "h"}, ' + A + "]", "4 finite numbers"),
    ("null-coordinate", '[{"bbox_2d": [null, 2, 3, 4], "hint": "h"}, ' + A + "]", "4 finite numbers"),
    ("word-coordinate", '[{"bbox_2d": ["left", 2, 3, 4], "hint": "h"}, ' + A + "]", "4 finite numbers"),
    ("number-hint", '[{"bbox_2d": [1, 2, 3, 4], "hint": 7}, ' + A + "]", "hint is a int, not text"),
    ("item-not-object", "[" + A + ", [1, 2, 3, 4]]", "region 2 is a list, not an object"),
    ("single-object", A, "holds a JSON dict, not a list"),
    ("string", '"just text"', "holds a JSON str, not a list"),
    ("number", "42", "holds a JSON int, not a list"),
]


@pytest.mark.parametrize("block, why", [c[1:] for c in FALLBACK], ids=[c[0] for c in FALLBACK])
def test_what_the_official_code_cannot_execute_becomes_a_global_edit(block, why):
    plan = official(reply(block, gen="make it warmer"))
    assert plan.regions == () and plan.global_prompt == "make it warmer"
    (note,) = plan.repairs
    assert why in note and "global edit" in note


@pytest.mark.parametrize("text, note", [
    ("<think>t</think><gen_image>g</gen_image>", "no <region>"),
    (HEAD + "<region>[" + A + "]", "no <region>"),  # truncated: the closing tag never came
], ids=["missing", "unclosed"])
def test_no_region_block_is_a_global_edit(text, note):
    plan = official(text)
    assert plan.regions == () and plan.global_prompt == "g" and note in plan.repairs[0]


@pytest.mark.parametrize("block", ["[]", "null", "0", '""', "false"])
def test_an_empty_or_falsy_region_value_is_a_global_edit_without_complaint(block):
    plan = official(reply(block))
    assert plan.regions == () and plan.repairs == ()


@pytest.mark.parametrize("item, note", [
    ('{"point_2d": [1, 2], "hint": "h"}', "no bbox_2d or no hint; skipped"),
    ('{"bbox": [1, 2, 3, 4], "hint": "h"}', "no bbox_2d or no hint; skipped"),  # the official key only
    ('{"bbox_2d": [1, 2, 3, 4]}', "no bbox_2d or no hint; skipped"),
    ('{"bbox_2d": [1, 2, 3, 4], "hint": ""}', "no bbox_2d or no hint; skipped"),
    ('{"bbox_2d": [1, 2, 3, 4], "hint": null}', "no bbox_2d or no hint; skipped"),
    ('{"bbox_2d": [], "hint": "h"}', "no bbox_2d or no hint; skipped"),
    ('{"bbox_2d": [1, 2, 3, 4], "hint": "   "}', "hint is blank; skipped"),
])
def test_items_the_official_code_skips_are_skipped(item, note):
    plan = official(reply("[" + item + ", " + A + "]"))
    assert pairs(plan) == [(BOX_A, "a")]
    (got,) = plan.repairs
    assert got.startswith("region 1") and note in got


def test_boxes_outside_the_image_are_kept_raw():
    body = '[{"bbox_2d": [-30, 100, 200, 300], "hint": "p"}, {"bbox_2d": [700, 10, 800, 50], "hint": "o"}]'
    plan = official(reply(body), (640, 480))
    assert pairs(plan) == [((-30.0, 100.0, 200.0, 300.0), "p"), ((700.0, 10.0, 800.0, 50.0), "o")]
    assert plan.repairs == ()
    # official expand_bbox: expand the raw box, then clamp; the outside box covers nothing
    assert plan.expanded_boxes(0.15) == [(0, 70, 234, 330), (685, 4, 640, 56)]


def test_numbers_written_as_strings_are_read_and_hints_are_kept_as_written():
    plan = official(reply('[{"bbox_2d": ["10", "20", 30, " 40.5 "], "hint": "  a cat  "}]'))
    assert pairs(plan) == [((10.0, 20.0, 30.0, 40.5), "  a cat  ")] and plan.repairs == ()


def test_a_bad_point_is_ignored_and_the_region_kept():
    plan = official(reply('[{"bbox_2d": [10, 20, 30, 40], "point_2d": [1, NaN], "hint": "a"}]'))
    assert pairs(plan) == [(BOX_A, "a")] and plan.regions[0].point is None and plan.repairs == ()


@pytest.mark.parametrize("text", [
    '<think>t</think><gen_image>make it warmer<region>[' + A + ']</region>',
    "<think>t</think><region>[" + A + "]</region>",
    '<think>t</think><gen_image>   </gen_image><region>[' + A + ']</region>',
], ids=["unclosed", "missing", "blank"])
def test_the_prompt_falls_back_to_a_single_space(text):
    plan = official(text)
    assert plan.global_prompt == "" and plan.prompt_text == " " and pairs(plan) == [(BOX_A, "a")]


def test_the_first_blocks_win():
    text = reply("[" + A + "]", gen=" first ") + '<gen_image>second</gen_image><region>[]</region>'
    plan = official(text)
    assert plan.global_prompt == "first" and pairs(plan) == [(BOX_A, "a")]


def test_planner_frame_mapping_applies_in_official_mode():
    body = '[{"bbox_2d": [252, 189, 504, 378], "point_2d": [378, 283.5], "hint": "a"}]'
    plan = official(reply(body), (4000, 3000), planner_size=(1008, 756))
    assert plan.boxes == [(1000.0, 750.0, 2000.0, 1500.0)] and plan.regions[0].point == (1500.0, 1125.0)


def test_official_mode_never_raises_on_text_but_refuses_non_text():
    for text in ["", "<region>", "<region>[{</region>", b"\xff<region>[]</region>", "<gen_image>" * 1000]:
        assert official(text).regions == ()
    with pytest.raises(PlanParseError, match="must be a string"):
        official(None)
    with pytest.raises(PlanParseError, match="planner_size needs image_size"):
        parse_plan(OFFICIAL, mode="official", planner_size=(10, 10))


def test_parse_modes():
    assert PARSE_MODES == ("lenient", "strict", "official")
    assert parse_mode() == "lenient" and parse_mode(strict=True) == "strict" and parse_mode("official") == "official"
    assert parse_mode("strict", strict=True) == "strict"
    with pytest.raises(ValueError, match="unknown parse mode 'exact'"):
        parse_mode("exact")
    with pytest.raises(ValueError, match="contradicts parse mode 'official'"):
        parse_plan(OFFICIAL, mode="official", strict=True)
