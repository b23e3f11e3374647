"""parse_plan: the official grammar, every malformed class (lenient repair vs strict error), frames, garbage."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import pytest

from replan.coords import box_area, clip_box
from replan.parse import PlanParseError, parse_plan
from replan.plan import RegionPlan

OFFICIAL = (
    '<think>Reasoning process</think><gen_image>Global edit instruction</gen_image><region>[{"bbox_2d": '
    '[10,150,150,210], "point_2d": [30,175], "hint": "change the color of this one apple to blue"}, {"bbox_2d": '
    '[150,50,200,150], "point_2d": [175,75], "hint": "keep this one apple unchanged"}]</region>'
)
OFFICIAL_REGIONS = [
    ((10.0, 150.0, 150.0, 210.0), "change the color of this one apple to blue", (30.0, 175.0)),
    ((150.0, 50.0, 200.0, 150.0), "keep this one apple unchanged", (175.0, 75.0)),
]
HEAD = "<think>t</think><gen_image>g</gen_image>"
A = '{"bbox_2d": [10, 20, 30, 40], "hint": "a"}'  # a valid region
B = '{"bbox_2d": [50, 60, 70, 80], "hint": "b"}'
BOX_A, BOX_B = (10.0, 20.0, 30.0, 40.0), (50.0, 60.0, 70.0, 80.0)


def reply(region_body: str, think: str = "t", gen: str = "g") -> str:
    return f"<think>{think}</think><gen_image>{gen}</gen_image><region>{region_body}</region>"


def triples(plan: RegionPlan) -> list[tuple]:
    return [(r.bbox, r.hint, r.point) for r in plan.regions]


def pairs(plan: RegionPlan) -> list[tuple]:
    return [(r.bbox, r.hint) for r in plan.regions]


# ==================================================================================================== valid output
@pytest.mark.parametrize("strict", [False, True])
def test_official_example_exact(strict):
    plan = parse_plan(OFFICIAL, strict=strict)
    assert isinstance(plan, RegionPlan)
    assert plan.reasoning == "Reasoning process"
    assert plan.global_prompt == "Global edit instruction"
    assert plan.prompt_text == "Global edit instruction"
    assert triples(plan) == OFFICIAL_REGIONS
    assert plan.boxes == [r[0] for r in OFFICIAL_REGIONS]
    assert plan.hints == [r[1] for r in OFFICIAL_REGIONS]
    assert plan.repairs == ()
    assert plan.raw_text == OFFICIAL
    assert plan.image_size is None


@pytest.mark.parametrize("strict", [False, True])
def test_official_example_with_image_size_inside(strict):
    plan = parse_plan(OFFICIAL, (224, 224), strict=strict)
    assert triples(plan) == OFFICIAL_REGIONS
    assert plan.image_size == (224, 224)
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
def test_one_region(strict):
    plan = parse_plan(reply(f"[{A}]"), (100, 100), strict=strict)
    assert triples(plan) == [(BOX_A, "a", None)]
    assert plan.global_prompt == "g" and plan.reasoning == "t"
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
def test_several_regions_keep_order(strict):
    items = [{"bbox_2d": [i, i + 1, i + 10, i + 20], "hint": f"hint {i}"} for i in range(0, 70, 10)]
    plan = parse_plan(reply(json.dumps(items)), (200, 200), strict=strict)
    assert pairs(plan) == [((float(i), i + 1.0, i + 10.0, i + 20.0), f"hint {i}") for i in range(0, 70, 10)]
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("body", ["[]", " [ ] ", "\n[]\n"])
def test_empty_region_list_is_a_global_edit(strict, body):
    plan = parse_plan(reply(body, gen="make it night"), strict=strict)
    assert plan.regions == ()
    assert plan.global_prompt == "make it night"
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
def test_whitespace_and_newlines_between_and_inside_tags(strict):
    text = (
        "\n  <think>\n  first line\n  second line \n</think>\n\n"
        "<gen_image>  make the sky red \n</gen_image>\n\t"
        '<region>\n[\n  {\n    "bbox_2d": [1, 2, 3, 4],\n    "hint": "  sky  "\n  }\n]\n</region>\n  '
    )
    plan = parse_plan(text, strict=strict)
    assert plan.reasoning == "first line\n  second line"
    assert plan.global_prompt == "make the sky red"
    assert pairs(plan) == [((1.0, 2.0, 3.0, 4.0), "sky")]
    assert plan.repairs == ()
    assert plan.raw_text == text


@pytest.mark.parametrize("strict", [False, True])
def test_int_and_float_coordinates(strict):
    body = '[{"bbox_2d": [10.5, 20.25, 30, 40.75], "point_2d": [12.125, 30], "hint": "x"}, ' + A + "]"
    plan = parse_plan(reply(body), (100, 100), strict=strict)
    assert triples(plan) == [((10.5, 20.25, 30.0, 40.75), "x", (12.125, 30.0)), (BOX_A, "a", None)]
    assert all(isinstance(v, float) for r in plan.regions for v in r.bbox)
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
def test_point_2d_is_kept_and_optional(strict):
    body = '[{"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 20], "hint": "p"}, {"bbox_2d": [0, 0, 5, 5], "hint": "q"}]'
    plan = parse_plan(reply(body), strict=strict)
    assert [r.point for r in plan.regions] == [(25.0, 20.0), None]


@pytest.mark.parametrize("strict", [False, True])
def test_empty_gen_image_gives_single_space_prompt(strict):
    plan = parse_plan(reply(f"[{A}]", gen=""), strict=strict)
    assert plan.global_prompt == ""
    assert plan.prompt_text == " "
    assert plan.repairs == ()
    plan = parse_plan(reply("[]", gen="   \n "), strict=strict)
    assert plan.prompt_text == " "


@pytest.mark.parametrize("strict", [False, True])
def test_empty_think_block_is_valid(strict):
    plan = parse_plan(reply(f"[{A}]", think=""), strict=strict)
    assert plan.reasoning == ""
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
def test_unicode_hint_and_escapes(strict):
    body = json.dumps([{"bbox_2d": [1, 2, 3, 4], "hint": 'rouge "vif" — 苹果 \\ ok'}], ensure_ascii=True)
    plan = parse_plan(reply(body, gen="é"), strict=strict)
    assert plan.hints == ['rouge "vif" — 苹果 \\ ok']
    assert plan.global_prompt == "é"


@pytest.mark.parametrize("strict", [False, True])
def test_utf8_bytes_input(strict):
    plan = parse_plan(OFFICIAL.encode("utf-8"), strict=strict)
    assert triples(plan) == OFFICIAL_REGIONS
    assert plan.raw_text == OFFICIAL
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
def test_box_touching_the_image_border_is_inside(strict):
    plan = parse_plan(reply('[{"bbox_2d": [0, 0, 640, 480], "hint": "all"}]'), (640, 480), strict=strict)
    assert plan.boxes == [(0.0, 0.0, 640.0, 480.0)]
    assert plan.repairs == ()


def test_block_order_and_first_block_wins():
    # a later stray closing tag does not extend the first block
    plan = parse_plan(reply(f"[{A}]", think="a </b> c"))
    assert plan.reasoning == "a </b> c"
    assert pairs(plan) == [(BOX_A, "a")]


# ==================================================================================================== malformed
@dataclass
class Bad:
    id: str
    text: str
    regions: list  # expected lenient (bbox, hint) pairs
    repairs: list  # substrings, one per expected repair, in order
    error: str  # substring of the strict PlanParseError
    position: int | None = None  # expected strict .position (None: not checked to be a number, must be None)
    image_size: tuple | None = None
    prompt: str = "g"


def _pos(text: str, needle: str, plus: int = 0) -> int:
    return text.index(needle) + plus


_FENCED = "```\n" + OFFICIAL + "\n```"
_FENCED_LANG = "```xml\n" + OFFICIAL + "\n```\n"
_FENCE_IN_REGION = HEAD + "<region>```json\n[" + A + "]\n```</region>"
_FENCE_IN_REGION_SPACED = HEAD + "<region>\n  ```\n[" + A + "]\n```\n</region>"
_TRAILING = reply('[{"bbox_2d": [10, 20, 30, 40,], "hint": "a",}, ' + B + ",]")
_SINGLE = reply("[{'bbox_2d': [10, 20, 30, 40], 'hint': 'a'}, {'bbox_2d': [50, 60, 70, 80], 'hint': \"b\"}]")
_SINGLE_TRAILING = reply("[{'bbox_2d': [10, 20, 30, 40], 'hint': 'a',},]")
_NO_THINK = f"<gen_image>g</gen_image><region>[{A}]</region>"
_UNCLOSED_THINK = f"<think>reasoning<gen_image>g</gen_image><region>[{A}]</region>"
_UNCLOSED_THINK_NO_GEN = f"<think>reasoning<region>[{A}]</region>"
_TRUNC_MID_OBJECT = HEAD + f'<region>[{A}, {B}, {{"bbox_2d": [5, 6, 7'
_TRUNC_MID_HINT = HEAD + f'<region>[{A}, {{"bbox_2d": [5, 6, 7, 8], "hint": "cut }} {{ here'
_TRUNC_AFTER_COMMA = HEAD + f"<region>[{A}, "
_TRUNC_COMPLETE_LIST = HEAD + f"<region>[{A}]"
_TRUNC_NOTHING = HEAD + '<region>[{"bbox_2d": [1, 2'
_SWAPPED = reply('[{"bbox_2d": [300, 250, 100, 50], "hint": "a"}]')
_SWAPPED_X = reply('[{"bbox_2d": [300, 50, 100, 250], "hint": "a"}, ' + B + "]")
_PARTLY = reply('[{"bbox_2d": [-10, 20, 250, 120], "hint": "a"}]')
_PARTLY_FLOAT = reply('[{"bbox_2d": [150.5, -0.5, 200.25, 99.75], "hint": "a"}]')
_OUTSIDE = reply('[{"bbox_2d": [300, 10, 400, 50], "hint": "gone"}, ' + A + "]")
_OUTSIDE_NEG = reply('[{"bbox_2d": [-50, -40, -10, -5], "hint": "gone"}, ' + A + "]")
_OUTSIDE_EDGE = reply('[{"bbox_2d": [200, 10, 260, 50], "hint": "gone"}, ' + A + "]")
_ZERO_W = reply('[{"bbox_2d": [10, 10, 10, 50], "hint": "z"}, ' + A + "]")
_ZERO_H = reply('[{"bbox_2d": [10, 10, 50, 10], "hint": "z"}, ' + A + "]")
_NO_HINT = reply('[{"bbox_2d": [1, 2, 3, 4]}, ' + A + "]")
_EMPTY_HINT = reply('[{"bbox_2d": [1, 2, 3, 4], "hint": "  "}, ' + A + "]")
_NULL_HINT = reply('[{"bbox_2d": [1, 2, 3, 4], "hint": null}, ' + A + "]")
_NUM_HINT = reply('[{"bbox_2d": [1, 2, 3, 4], "hint": 7}, ' + A + "]")
_NO_BBOX = reply('[{"point_2d": [1, 2], "hint": "h"}, ' + A + "]")
_THREE = reply('[{"bbox_2d": [1, 2, 3], "hint": "h"}, ' + A + "]")
_FIVE = reply('[{"bbox_2d": [1, 2, 3, 4, 5], "hint": "h"}, ' + A + "]")
_NAN = reply('[{"bbox_2d": [NaN, 2, 3, 4], "hint": "h"}, ' + A + "]")
_INF = reply('[{"bbox_2d": [1, 2, Infinity, 4], "hint": "h"}, ' + A + "]")
_NEG_INF = reply('[{"bbox_2d": [-Infinity, 2, 3, 4], "hint": "h"}, ' + A + "]")
_HUGE = reply('[{"bbox_2d": [1e400, 2, 3, 4], "hint": "h"}, ' + A + "]")
_BIGINT = reply('[{"bbox_2d": [1, 2, ' + "9" * 400 + ', 4], "hint": "h"}, ' + A + "]")
_BOOL = reply('[{"bbox_2d": [true, 2, 3, 4], "hint": "h"}, ' + A + "]")
_NULL_COORD = reply('[{"bbox_2d": [null, 2, 3, 4], "hint": "h"}, ' + A + "]")
_BAD_POINT = reply('[{"bbox_2d": [10, 20, 30, 40], "point_2d": [1, NaN], "hint": "a"}]')
_DICT = HEAD + "<region>" + A + "</region>"
_NUMBER = HEAD + "<region>42</region>"
_STRING = HEAD + '<region>"just text"</region>'
_ITEM_NOT_OBJECT = reply("[" + A + ', [1, 2, 3, 4], "x"]')
_TEXT_BEFORE = "Sure! Here is the plan: " + OFFICIAL
_TEXT_AFTER = OFFICIAL + " Hope this helps."
_TEXT_BETWEEN = "<think>t</think> and then <gen_image>g</gen_image><region>[" + A + "]</region>"
_NO_GEN = f"<think>t</think><region>[{A}]</region>"
_NO_REGION = "<think>t</think><gen_image>make it winter</gen_image>"
_EMPTY_REGION = HEAD + "<region>  </region>"
_NOT_JSON = HEAD + "<region>the apple on the left</region>"
_PAIR_OF_POINTS = reply('[{"bbox_2d": [[10, 20], [30, 40]], "hint": "a"}]')
_BBOX_KEY = reply('[{"bbox": [10, 20, 30, 40], "hint": "a"}]')
_STRING_NUMS = reply('[{"bbox_2d": ["10", "20", 30, "40.0"], "hint": "a"}]')

MALFORMED = [
    Bad("fence_whole", _FENCED, [(r[0], r[1]) for r in OFFICIAL_REGIONS], ["code fence"], "text outside the tags", 0,
        prompt="Global edit instruction"),
    Bad("fence_whole_lang", _FENCED_LANG, [(r[0], r[1]) for r in OFFICIAL_REGIONS], ["code fence"],
        "text outside the tags", 0, prompt="Global edit instruction"),
    Bad("fence_in_region", _FENCE_IN_REGION, [(BOX_A, "a")], ["region list wrapped in a code fence"],
        "not valid JSON", _pos(_FENCE_IN_REGION, "```")),
    Bad("fence_in_region_spaced", _FENCE_IN_REGION_SPACED, [(BOX_A, "a")], ["code fence"], "not valid JSON",
        _pos(_FENCE_IN_REGION_SPACED, "```")),
    Bad("trailing_commas", _TRAILING, [(BOX_A, "a"), (BOX_B, "b")], ["trailing commas"], "not valid JSON",
        _pos(_TRAILING, "40,]", 3)),
    Bad("single_quotes", _SINGLE, [(BOX_A, "a"), (BOX_B, "b")], ["single quotes"], "double quotes",
        _pos(_SINGLE, "[{", 2)),
    Bad("single_quotes_trailing_commas", _SINGLE_TRAILING, [(BOX_A, "a")], ["single quotes"], "not valid JSON",
        _pos(_SINGLE_TRAILING, "[{", 2)),
    Bad("missing_think", _NO_THINK, [(BOX_A, "a")], ["missing <think>"], "missing <think>"),
    Bad("unclosed_think", _UNCLOSED_THINK, [(BOX_A, "a")], ["<think> is never closed"], "<think> is never closed", 0),
    Bad("unclosed_think_no_gen", _UNCLOSED_THINK_NO_GEN, [(BOX_A, "a")],
        ["<think> is never closed", "missing <gen_image>"], "<think> is never closed", 0, prompt=""),
    Bad("truncated_mid_object", _TRUNC_MID_OBJECT, [(BOX_A, "a"), (BOX_B, "b")],
        ["<region> is never closed", "kept 2 complete object"], "<region> is never closed",
        _pos(_TRUNC_MID_OBJECT, "<region>")),
    Bad("truncated_mid_hint_with_braces", _TRUNC_MID_HINT, [(BOX_A, "a")],
        ["<region> is never closed", "kept 1 complete object"], "<region> is never closed",
        _pos(_TRUNC_MID_HINT, "<region>")),
    Bad("truncated_after_comma", _TRUNC_AFTER_COMMA, [(BOX_A, "a")],
        ["<region> is never closed", "kept 1 complete object"], "<region> is never closed",
        _pos(_TRUNC_AFTER_COMMA, "<region>")),
    Bad("missing_close_tag_only", _TRUNC_COMPLETE_LIST, [(BOX_A, "a")], ["<region> is never closed"],
        "<region> is never closed", _pos(_TRUNC_COMPLETE_LIST, "<region>")),
    Bad("truncated_no_complete_object", _TRUNC_NOTHING, [], ["<region> is never closed", "not valid JSON"],
        "<region> is never closed", _pos(_TRUNC_NOTHING, "<region>")),
    Bad("swapped_corners", _SWAPPED, [((100.0, 50.0, 300.0, 250.0), "a")], ["swapped corners"],
        "region 1 box [300, 250, 100, 50] has swapped corners"),
    Bad("swapped_x_only", _SWAPPED_X, [((100.0, 50.0, 300.0, 250.0), "a"), (BOX_B, "b")], ["swapped corners"],
        "swapped corners"),
    Bad("entirely_outside", _OUTSIDE, [(BOX_A, "a")], ["region 1 box [300, 10, 400, 50] lies outside the 200x100"],
        "lies outside the 200x100 image", image_size=(200, 100)),
    Bad("entirely_outside_negative", _OUTSIDE_NEG, [(BOX_A, "a")], ["lies outside"], "lies outside",
        image_size=(200, 100)),
    Bad("outside_touching_edge", _OUTSIDE_EDGE, [(BOX_A, "a")], ["lies outside"], "lies outside",
        image_size=(200, 100)),
    Bad("zero_width", _ZERO_W, [(BOX_A, "a")], ["region 1 box [10, 10, 10, 50] has zero area"], "zero area"),
    Bad("zero_height", _ZERO_H, [(BOX_A, "a")], ["zero area"], "region 1 box [10, 10, 50, 10] has zero area",
        image_size=(100, 100)),
    Bad("missing_hint", _NO_HINT, [(BOX_A, "a")], ["region 1 has no hint"], "region 1 has no hint"),
    Bad("empty_hint", _EMPTY_HINT, [(BOX_A, "a")], ["region 1 has no hint"], "no hint"),
    Bad("null_hint", _NULL_HINT, [(BOX_A, "a")], ["no hint"], "no hint"),
    Bad("number_hint", _NUM_HINT, [(BOX_A, "a")], ["no hint"], "no hint"),
    Bad("missing_bbox", _NO_BBOX, [(BOX_A, "a")], ["region 1 has no bbox_2d"], "region 1 has no bbox_2d"),
    Bad("bbox_three_numbers", _THREE, [(BOX_A, "a")], ["region 1 bbox_2d must be a list of 4 numbers"],
        "list of 4 numbers, got [1, 2, 3]"),
    Bad("bbox_five_numbers", _FIVE, [(BOX_A, "a")], ["list of 4 numbers"], "list of 4 numbers"),
    Bad("nan", _NAN, [(BOX_A, "a")], ["region 1 bbox_2d must hold finite numbers"], "finite numbers"),
    Bad("infinity", _INF, [(BOX_A, "a")], ["finite numbers"], "finite numbers"),
    Bad("negative_infinity", _NEG_INF, [(BOX_A, "a")], ["finite numbers"], "finite numbers"),
    Bad("overflowing_float", _HUGE, [(BOX_A, "a")], ["finite numbers"], "finite numbers"),
    Bad("huge_integer", _BIGINT, [(BOX_A, "a")], ["finite numbers"], "finite numbers"),
    Bad("bool_coordinate", _BOOL, [(BOX_A, "a")], ["finite numbers"], "finite numbers"),
    Bad("null_coordinate", _NULL_COORD, [(BOX_A, "a")], ["finite numbers"], "finite numbers"),
    Bad("nan_point_dropped_region_kept", _BAD_POINT, [(BOX_A, "a")], ["point_2d must hold finite numbers"],
        "point_2d"),
    Bad("region_block_is_dict", _DICT, [(BOX_A, "a")], ["single object, not a list"], "single object, not a list"),
    Bad("region_block_is_number", _NUMBER, [], ["region block holds a int, not a list"], "holds a int"),
    Bad("region_block_is_string", _STRING, [], ["holds a str"], "holds a str"),
    Bad("item_not_an_object", _ITEM_NOT_OBJECT, [(BOX_A, "a")],
        ["region 2 is a list, not an object", "region 3 is a str"], "region 2 is a list"),
    Bad("text_before_tags", _TEXT_BEFORE, [(r[0], r[1]) for r in OFFICIAL_REGIONS], ["text outside the tags"],
        "text outside the tags", 0, prompt="Global edit instruction"),
    Bad("text_after_tags", _TEXT_AFTER, [(r[0], r[1]) for r in OFFICIAL_REGIONS], ["text outside the tags"],
        "text outside the tags", len(OFFICIAL), prompt="Global edit instruction"),
    Bad("text_between_tags", _TEXT_BETWEEN, [(BOX_A, "a")], ["text outside the tags"], "text outside the tags",
        _pos(_TEXT_BETWEEN, "</think>", len("</think>"))),
    Bad("missing_gen_image", _NO_GEN, [(BOX_A, "a")], ["missing <gen_image>"], "missing <gen_image>", prompt=""),
    Bad("missing_region", _NO_REGION, [], ["missing <region>"], "missing <region>", prompt="make it winter"),
    Bad("empty_region_block", _EMPTY_REGION, [], ["<region> block is empty"], "<region> block is empty"),
    Bad("region_not_json", _NOT_JSON, [], ["not valid JSON"], "not valid JSON", _pos(_NOT_JSON, "the apple")),
    Bad("bbox_pair_of_points", _PAIR_OF_POINTS, [(BOX_A, "a")], ["pair of points"], "pair of points"),
    Bad("bbox_key", _BBOX_KEY, [(BOX_A, "a")], ["key 'bbox' instead of 'bbox_2d'"], "'bbox' instead of 'bbox_2d'"),
    Bad("numbers_as_strings", _STRING_NUMS, [(BOX_A, "a")], ["written as a string"] * 3, "finite numbers"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_malformed_lenient_repairs_and_records(case):
    plan = parse_plan(case.text, case.image_size)
    assert pairs(plan) == case.regions
    assert plan.global_prompt == case.prompt
    assert plan.raw_text == case.text
    assert len(plan.repairs) == len(case.repairs), plan.repairs
    for want, got in zip(case.repairs, plan.repairs):
        assert want in got, (want, plan.repairs)
    if case.image_size:
        for box in plan.boxes:
            assert box_area(clip_box(box, case.image_size)) > 0  # kept boxes overlap the image


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_malformed_strict_raises_naming_the_problem(case):
    with pytest.raises(PlanParseError) as info:
        parse_plan(case.text, case.image_size, strict=True)
    err = info.value
    assert isinstance(err, ValueError)
    assert case.error in str(err)
    assert err.position == case.position
    if case.position is not None:
        assert f"(at character {case.position})" in str(err)


def test_strict_json_position_points_into_the_whole_text():
    text = reply('[{"bbox_2d": [1, 2, 3, 4] "hint": "a"}]')  # missing comma
    with pytest.raises(PlanParseError, match="Expecting ','") as info:
        parse_plan(text, strict=True)
    assert info.value.position == text.index('"hint"')


def test_lenient_never_changes_a_valid_region_next_to_a_repaired_one():
    text = reply("[" + A + ', {"bbox_2d": [90, 90, 10, 10], "hint": "s"}, ' + B + "]")
    plan = parse_plan(text, (100, 100))
    assert pairs(plan) == [(BOX_A, "a"), ((10.0, 10.0, 90.0, 90.0), "s"), (BOX_B, "b")]
    assert len(plan.repairs) == 1 and "region 2" in plan.repairs[0]


def test_region_numbers_in_repairs_follow_the_planner_list():
    body = "[" + ", ".join([A, '{"hint": "x"}', A, '{"bbox_2d": [1, 1, 1, 1], "hint": "y"}']) + "]"
    plan = parse_plan(reply(body))
    assert len(plan.regions) == 2
    assert [r.split(" ", 2)[1] for r in plan.repairs] == ["2", "4"]


def test_invalid_utf8_bytes():
    data = reply(f"[{A}]").encode() + b"\xff\xfe"
    plan = parse_plan(data)
    assert pairs(plan) == [(BOX_A, "a")]
    assert any("not valid UTF-8" in r for r in plan.repairs)
    with pytest.raises(PlanParseError, match="not valid UTF-8") as info:
        parse_plan(data, strict=True)
    assert info.value.position == len(data) - 2


@pytest.mark.parametrize("mode", ["lenient", "strict", "official"])
@pytest.mark.parametrize("text, box", [(_PARTLY, (-10.0, 20.0, 250.0, 120.0)),
                                       (_PARTLY_FLOAT, (150.5, -0.5, 200.25, 99.75))], ids=["int", "float"])
def test_a_box_partly_outside_the_image_is_kept_raw_in_every_mode(mode, text, box):
    # the editor expands the raw box and clamps afterwards (official); clipping here would change the expansion
    plan = parse_plan(text, (200, 100), mode=mode)
    assert plan.boxes == [box] and plan.repairs == ()


def test_swapped_and_partly_outside_combined():
    plan = parse_plan(reply('[{"bbox_2d": [250, 120, -10, 20], "hint": "a"}]'), (200, 100))
    assert plan.boxes == [(-10.0, 20.0, 250.0, 120.0)]
    assert len(plan.repairs) == 1 and "swapped corners" in plan.repairs[0]


def test_without_image_size_nothing_is_clipped():
    plan = parse_plan(reply('[{"bbox_2d": [-10, -20, 5000, 6000], "hint": "a"}]'))
    assert plan.boxes == [(-10.0, -20.0, 5000.0, 6000.0)]
    assert plan.repairs == ()


def test_parse_plan_error_is_value_error_with_position_attribute():
    err = PlanParseError("boom", 7)
    assert isinstance(err, ValueError)
    assert err.position == 7 and str(err) == "boom (at character 7)"
    assert PlanParseError("boom").position is None and str(PlanParseError("boom")) == "boom"


# ==================================================================================================== frames
@pytest.mark.parametrize("strict", [False, True])
def test_planner_size_maps_1008x756_frame_onto_4000x3000(strict):
    body = '[{"bbox_2d": [252, 189, 504, 378], "point_2d": [378, 283.5], "hint": "a"}]'
    plan = parse_plan(reply(body), (4000, 3000), strict=strict, planner_size=(1008, 756))
    assert plan.boxes == [(1000.0, 750.0, 2000.0, 1500.0)]
    assert plan.regions[0].point == (1500.0, 1125.0)
    assert plan.image_size == (4000, 3000)
    assert plan.repairs == ()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(
    "image_size, planner_size",
    [((300, 200), (308, 196)), ((1152, 864), (1148, 868)), ((5472, 3648), (1624, 1092))],
    ids=["small-300x200", "1MP", "20MP"],
)
def test_planner_size_conversion_at_three_image_sizes(strict, image_size, planner_size):
    (W, H), (pw, ph) = image_size, planner_size
    boxes = [
        [0, 0, pw, ph],  # the whole planner frame is the whole image, exactly
        [pw // 4, ph // 3, pw // 2, ph - 1],
        [1, 2, 3, 4],
        [pw / 7, ph / 9, pw / 3, ph / 2],
    ]
    items = [{"bbox_2d": b, "point_2d": [b[0], b[3]], "hint": f"r{i}"} for i, b in enumerate(boxes)]
    plan = parse_plan(reply(json.dumps(items)), image_size, strict=strict, planner_size=planner_size)
    assert plan.repairs == ()
    assert len(plan.regions) == len(boxes)
    assert plan.boxes[0] == (0.0, 0.0, float(W), float(H))
    for b, region in zip(boxes, plan.regions):
        want = (b[0] * W / pw, b[1] * H / ph, b[2] * W / pw, b[3] * H / ph)
        assert region.bbox == pytest.approx(want, rel=1e-12, abs=1e-9)
        assert region.point == pytest.approx((want[0], want[3]), rel=1e-12, abs=1e-9)
        assert 0 <= region.bbox[0] < region.bbox[2] <= W and 0 <= region.bbox[1] < region.bbox[3] <= H


def test_planner_frame_edge_maps_onto_the_image_edge_for_many_sizes():
    # x * (W / pw) can land one ulp past W; the mapped border must be exactly W (strict mode would reject it)
    for pw in range(28, 2000, 28):
        for W in (300, 1000, 1152, 3000, 4000, 4032, 5472, 6000):
            text = reply(f'[{{"bbox_2d": [0, 0, {pw}, {pw}], "hint": "all"}}]')
            plan = parse_plan(text, (W, W), strict=True, planner_size=(pw, pw))
            assert plan.boxes == [(0.0, 0.0, float(W), float(W))]


def test_planner_size_maps_before_swapping():
    body = '[{"bbox_2d": [1100, 10, 500, 100], "hint": "a"}]'  # swapped and past the 1008-wide frame
    plan = parse_plan(reply(body), (4032, 3024), planner_size=(1008, 756))
    assert plan.boxes == [(2000.0, 40.0, 4400.0, 400.0)]  # mapped, swapped back, kept past the border
    assert [r.split(";")[0] for r in plan.repairs] == ["region 1 box [4400, 40, 2000, 400] has swapped corners"]
    with pytest.raises(PlanParseError, match=r"region 1 box \[4400, 40, 2000, 400\] has swapped corners"):
        parse_plan(reply(body), (4032, 3024), strict=True, planner_size=(1008, 756))


@pytest.mark.parametrize("strict", [False, True])
def test_planner_size_needs_image_size(strict):
    with pytest.raises(PlanParseError, match="planner_size needs image_size"):
        parse_plan(OFFICIAL, strict=strict, planner_size=(1008, 756))


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": (0, 100)},
        {"image_size": (100, -1)},
        {"image_size": (100,)},
        {"image_size": "ab"},
        {"image_size": (100, 100), "planner_size": (0, 100)},
        {"image_size": (100, 100), "planner_size": (100, float("nan"))},
        {"image_size": (100, 100), "planner_size": 5},
    ],
)
def test_bad_sizes_are_parse_errors(strict, kwargs):
    with pytest.raises(PlanParseError, match="must be \\(W, H\\) with two positive numbers"):
        parse_plan(OFFICIAL, strict=strict, **kwargs)


# ==================================================================================================== garbage
def outcome(text, strict: bool):
    """A plan or a PlanParseError; any other exception fails the test."""
    try:
        return parse_plan(text, (640, 480), strict=strict)
    except PlanParseError as e:
        return e


def check_plan(plan: RegionPlan, size=(640, 480)) -> None:
    w, h = size
    assert isinstance(plan.global_prompt, str) and isinstance(plan.reasoning, str)
    assert all(isinstance(r, str) for r in plan.repairs)
    for r in plan.regions:
        x1, y1, x2, y2 = r.bbox
        assert x1 < x2 and y1 < y2 and box_area(clip_box(r.bbox, (w, h))) > 0, r.bbox  # overlaps the image
        assert r.hint.strip() == r.hint and r.hint
        assert all(math.isfinite(v) for v in r.bbox)


def check_garbage(text) -> None:
    strict = outcome(text, True)
    assert isinstance(strict, (RegionPlan, PlanParseError))
    lenient = outcome(text, False)
    assert isinstance(lenient, RegionPlan), f"lenient mode raised {lenient!r} on {text!r:.200}"
    check_plan(lenient)
    official = parse_plan(text, (640, 480), mode="official")  # never raises on text either
    assert all(r.bbox[0] < r.bbox[2] and r.bbox[1] < r.bbox[3] and r.hint.strip() for r in official.regions)
    if isinstance(strict, RegionPlan):  # strict accepted it: lenient must agree without repairs
        assert strict.repairs == ()
        assert lenient.regions == strict.regions and lenient.repairs == ()


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n", "\x00", "<", "<think>", "</region>", "[{", "```", "``````"])
def test_empty_and_tiny_inputs(text):
    check_garbage(text)
    plan = parse_plan(text)
    assert plan.regions == () and plan.raw_text == text


def test_empty_string_is_a_global_edit_in_lenient_and_an_error_in_strict():
    plan = parse_plan("")
    assert plan.regions == () and plan.global_prompt == "" and plan.prompt_text == " "
    assert len(plan.repairs) == 3
    with pytest.raises(PlanParseError, match="missing <think>"):
        parse_plan("", strict=True)
    with pytest.raises(PlanParseError, match="missing <think>"):
        parse_plan("   \n ", strict=True)


def test_random_bytes():
    rng = random.Random(1234)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        check_garbage(data)
        plan = parse_plan(data)
        assert isinstance(plan, RegionPlan)


FRAGMENTS = [
    "<think>", "</think>", "<gen_image>", "</gen_image>", "<region>", "</region>", "<region", "region>",
    "[", "]", "{", "}", "[{", "}]", "},", ":", ",", " ", "\n", '"', "'", "\\", "```", "```json\n",
    '"bbox_2d"', '"point_2d"', '"hint"', "'bbox_2d'", "'hint'", '"bbox"', '"a hint"', "'x'", "true", "null",
    "0", "12", "-5", "3.5", "640", "481", "1e309", "-1e309", "NaN", "Infinity", "9" * 30, "1e-300",
    '"bbox_2d": [', '"hint": "', "[10, 20, 30, 40]", "[[1, 2], [3, 4]]",
    '{"bbox_2d": [1, 2, 30, 40], "hint": "x"}', "{'bbox_2d': [5, 5, 700, 500], 'hint': 'y'}",
    '{"bbox_2d": [700, 10, 5, 470], "point_2d": [3, 4], "hint": "z"}', "é", "\x00", "\ud800", "🍎",
]


def random_fragments(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(n))


def test_random_tag_fragment_strings():
    rng = random.Random(20240611)
    regions_seen = 0
    for _ in range(200):
        text = random_fragments(rng, rng.randrange(1, 60))
        check_garbage(text)
        regions_seen += len(parse_plan(text, (640, 480)).regions)
    assert regions_seen > 0  # the generator does produce usable regions now and then


def test_random_near_valid_replies():
    """Valid replies with random damage: lenient always returns a plan whose boxes are inside the image."""
    rng = random.Random(7)
    for _ in range(200):
        items = []
        for _ in range(rng.randrange(0, 4)):
            x1, y1 = rng.uniform(-100, 700), rng.uniform(-100, 600)
            items.append({"bbox_2d": [x1, y1, x1 + rng.uniform(-50, 300), y1 + rng.uniform(-50, 300)], "hint": "h"})
        text = reply(json.dumps(items))
        chars = list(text)
        for _ in range(rng.randrange(0, 4)):
            op, i = rng.randrange(3), rng.randrange(len(chars) + 1)
            if op == 0 and i < len(chars):
                del chars[i]
            elif op == 1:
                chars.insert(i, rng.choice(FRAGMENTS))
            else:
                chars = chars[:i]
        check_garbage("".join(chars))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "{" * 100_000,
        "<region>" + "[" * 100_000 + "</region>",
        HEAD + "<region>" + "[" * 100_000,
        HEAD + "<region>" + "{" * 100_000 + "}" * 100_000 + "</region>",
        HEAD + "<region>" + '{"a":' * 100_000 + "1" + "}" * 100_000 + "</region>",
        HEAD + "<region>[" + '{"a":' * 100_000 + "1" + "}" * 100_000 + "]</region>",
        HEAD + "<region>" + "[" * 50_000 + "]" * 50_000 + "</region>",
        HEAD + "<region>" + "(" * 1000 + ")" * 1000 + "</region>",
        HEAD + "<region>" + "[" * 150 + "]" * 150 + "</region>",
    ],
    ids=["brackets", "braces", "region-brackets", "truncated-brackets", "region-braces", "nested-objects",
         "nested-objects-in-list", "balanced-brackets", "parens", "shallow-nesting"],
)
def test_deeply_nested_input(text):  # how fast: benchmark/parse_worst_case.py
    check_garbage(text)
    assert parse_plan(text).regions == ()


def test_integer_with_too_many_digits():
    text = reply('[{"bbox_2d": [1, 2, ' + "9" * 5000 + ", 4], \"hint\": \"h\"}]")
    check_garbage(text)
    with pytest.raises(PlanParseError, match="not valid JSON"):
        parse_plan(text, strict=True)


MB = 1 << 20


def _parsed(text) -> RegionPlan:
    """Parse a megabyte-sized reply (its speed is measured by benchmark/parse_worst_case.py, not asserted here)."""
    check_garbage(text)
    return parse_plan(text, (640, 480))


def test_one_megabyte_without_tags():
    plan = _parsed("lorem ipsum, dolor sit amet. " * (MB // 29))
    assert plan.regions == () and plan.global_prompt == ""


def test_one_megabyte_of_random_fragments():
    plan = _parsed(random_fragments(random.Random(3), 120_000)[:MB])
    assert isinstance(plan, RegionPlan)


def test_one_megabyte_reasoning_in_a_valid_reply():
    text = reply(f"[{A}]", think="x" * MB)
    plan = _parsed(text)
    assert pairs(plan) == [(BOX_A, "a")] and len(plan.reasoning) == MB
    assert parse_plan(text, strict=True).repairs == ()


def test_one_megabyte_of_regions_truncated():
    text = HEAD + "<region>[" + (A + ", ") * (MB // (len(A) + 2)) + A[:20]
    plan = _parsed(text)
    assert len(plan.regions) == MB // (len(A) + 2)


@pytest.mark.parametrize("tag", ["<think>", "<gen_image>", "<region>", "</region>", "```", "<region>[{"])
def test_one_megabyte_of_repeated_tags(tag):
    # a degenerate reply repeating one token: must stay linear (no regex rescans from every unclosed tag)
    _parsed(tag * (MB // len(tag)))


@pytest.mark.parametrize("value", [None, 0, 1.5, ["<think>"], {"a": 1}, object()])
@pytest.mark.parametrize("strict", [False, True])
def test_non_text_input_is_a_parse_error(value, strict):
    with pytest.raises(PlanParseError, match="must be a string"):
        parse_plan(value, strict=strict)


@pytest.mark.parametrize("strict", [False, True])
def test_bytearray_is_accepted(strict):
    assert triples(parse_plan(bytearray(OFFICIAL.encode()), strict=strict)) == OFFICIAL_REGIONS
