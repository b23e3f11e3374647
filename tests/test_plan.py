"""Region / RegionPlan: validation, JSON round-trip, re-rendering, size checks, transforms, overlay drawing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from replan.parse import parse_plan
from replan.plan import NO_GLOBAL_EDIT, SCHEMA_VERSION, Region, RegionPlan, draw_overlay

OFFICIAL = (
    '<think>Reasoning process</think><gen_image>Global edit instruction</gen_image><region>[{"bbox_2d": '
    '[10,150,150,210], "point_2d": [30,175], "hint": "change the color of this one apple to blue"}, {"bbox_2d": '
    '[150,50,200,150], "point_2d": [175,75], "hint": "keep this one apple unchanged"}]</region>'
)


def make_plan(**kw) -> RegionPlan:
    args = dict(
        global_prompt="make the apple blue",
        regions=(
            Region((10, 150, 150, 210), "change the color of this one apple to blue", (30, 175)),
            Region((150.5, 50.25, 200, 150), "keep this one apple unchanged"),
        ),
        reasoning="There are two apples.",
        image_size=(400, 300),
        raw_text="<think>…</think>",
        repairs=("something was repaired",),
    )
    args.update(kw)
    return RegionPlan(**args)


def same_content(a: RegionPlan, b: RegionPlan) -> None:
    assert a.global_prompt == b.global_prompt
    assert a.reasoning == b.reasoning
    assert a.regions == b.regions
    assert a.image_size == b.image_size


# ==================================================================================================== Region
def test_region_normalises_box_and_point_to_float_tuples():
    r = Region([1, 2, 3.5, 4], "h", [5, 6])
    assert r.bbox == (1.0, 2.0, 3.5, 4.0) and all(type(v) is float for v in r.bbox)
    assert r.point == (5.0, 6.0) and all(type(v) is float for v in r.point)
    assert Region((0, 0, 1, 1), "h").point is None


def test_region_is_frozen():
    r = Region((0, 0, 1, 1), "h")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.hint = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "bbox, match",
    [
        ((10, 10, 10, 20), r"region box \[10, 10, 10, 20\] has zero area: need x2 > x1 and y2 > y1"),
        ((10, 10, 20, 10), r"\[10, 10, 20, 10\] has zero area"),
        ((20, 10, 10, 20), "zero area"),  # inverted corners are not silently fixed here
        ((1.5, 2, 1.5, 3), r"\[1.5, 2, 1.5, 3\] has zero area"),
    ],
)
def test_region_zero_area(bbox, match):
    with pytest.raises(ValueError, match=match):
        Region(bbox, "h")


@pytest.mark.parametrize("hint", ["", "   ", "\n\t", None, 3, ["h"]])
def test_region_empty_or_non_string_hint(hint):
    with pytest.raises(ValueError, match=r"region \[0, 0, 5, 5\] needs a non-empty hint string, got"):
        Region((0, 0, 5, 5), hint)


@pytest.mark.parametrize("bbox", [(1, 2, 3), (1, 2, 3, 4, 5), (), "abcd", b"abcd"])
def test_region_box_needs_four_numbers(bbox):
    with pytest.raises(ValueError, match=r"a box needs exactly 4 numbers \[x1, y1, x2, y2\], got"):
        Region(bbox, "h")


@pytest.mark.parametrize(
    "bbox",
    [
        (float("nan"), 0, 5, 5),
        (0, 0, float("inf"), 5),
        (0, float("-inf"), 5, 5),
        (0, 0, 5, "5"),
        (0, 0, 5, None),
        (True, 0, 5, 5),
        (0, 0, 10**400, 5),
    ],
    ids=["nan", "inf", "-inf", "str", "none", "bool", "huge-int"],
)
def test_region_box_needs_finite_numbers(bbox):
    with pytest.raises(ValueError, match="box coordinates must be finite numbers"):
        Region(bbox, "h")


@pytest.mark.parametrize("point", [(1, 2, 3), (1,), (float("nan"), 1), (1, float("inf")), ("a", "b"), (10**400, 1)])
def test_region_bad_point(point):
    with pytest.raises(ValueError, match=r"region point must be two finite numbers \[x, y\]"):
        Region((0, 0, 5, 5), "h", point)


def test_region_from_dict_accepts_both_key_spellings():
    a = Region.from_dict({"bbox": [1, 2, 3, 4], "hint": "h", "point": [2, 3]})
    b = Region.from_dict({"bbox_2d": [1, 2, 3, 4], "hint": "h", "point_2d": [2, 3]})
    assert a == b == Region((1, 2, 3, 4), "h", (2, 3))
    with pytest.raises(ValueError, match="has no 'bbox'"):
        Region.from_dict({"hint": "h"})
    with pytest.raises(ValueError, match="must be an object"):
        Region.from_dict([1, 2, 3, 4])


# ==================================================================================================== RegionPlan
def test_plan_accessors():
    plan = make_plan()
    assert plan.boxes == [(10.0, 150.0, 150.0, 210.0), (150.5, 50.25, 200.0, 150.0)]
    assert plan.hints == ["change the color of this one apple to blue", "keep this one apple unchanged"]
    assert plan.prompt_text == "make the apple blue"
    assert make_plan(global_prompt="").prompt_text == " "
    assert make_plan(global_prompt="  \n").prompt_text == " "
    assert make_plan(global_prompt=NO_GLOBAL_EDIT).prompt_text == NO_GLOBAL_EDIT


def test_plan_normalises_sequences():
    plan = RegionPlan("g", [Region((0, 0, 1, 1), "h")], image_size=[640.0, 480.0], repairs=["r"])
    assert isinstance(plan.regions, tuple) and plan.repairs == ("r",)
    assert plan.image_size == (640, 480) and all(type(v) is int for v in plan.image_size)


@pytest.mark.parametrize("size", [(0, 10), (10, -1)])
def test_plan_rejects_non_positive_image_size(size):
    with pytest.raises(ValueError, match="image_size must be positive"):
        RegionPlan("g", image_size=size)


def test_plan_rejects_non_string_prompt():
    with pytest.raises(ValueError, match="global_prompt must be a string, got NoneType"):
        RegionPlan(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- serialisation
def test_to_dict_layout():
    d = make_plan().to_dict()
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["regions"][0] == {
        "bbox": [10, 150, 150, 210],
        "hint": "change the color of this one apple to blue",
        "point": [30, 175],
    }
    assert d["regions"][1] == {"bbox": [150.5, 50.25, 200, 150], "hint": "keep this one apple unchanged"}
    assert d["image_size"] == [400, 300]
    assert d["repairs"] == ["something was repaired"]
    json.dumps(d)  # serialisable


@pytest.mark.parametrize(
    "plan",
    [
        make_plan(),
        make_plan(image_size=None, repairs=(), raw_text="", reasoning=""),
        make_plan(regions=(), global_prompt=""),
        make_plan(global_prompt="rendre la pomme « bleue » 🍎", reasoning="行\n\"quoted\""),
        parse_plan(OFFICIAL, (224, 224)),
        # planner-frame boxes land on non-round floats: they must survive the file exactly
        parse_plan(OFFICIAL, (4000, 3000), planner_size=(1008, 756)),
        make_plan(regions=(Region((1 / 3, 2 / 3, 100 / 7, 1e-7 + 50), "h", (0.1 + 0.2, 1 / 9)),)),
    ],
    ids=["full", "bare", "no-regions", "unicode", "parsed", "planner-frame", "awkward-floats"],
)
def test_json_round_trip_via_save_and_load(tmp_path, plan):
    path = plan.save(tmp_path / "nested" / "dir" / "plan.json")
    assert path == tmp_path / "nested" / "dir" / "plan.json" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    loaded = RegionPlan.load(path)
    assert loaded == plan
    assert RegionPlan.load(str(path)) == plan
    assert RegionPlan.from_dict(json.loads(plan.to_json())) == plan


def test_save_overwrites(tmp_path):
    path = tmp_path / "plan.json"
    make_plan().save(path)
    other = make_plan(global_prompt="other")
    other.save(path)
    assert RegionPlan.load(path) == other


def _write(tmp_path, obj, name="plan.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def test_load_schema_version_mismatch(tmp_path):
    d = make_plan().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    path = _write(tmp_path, d)
    with pytest.raises(ValueError) as info:
        RegionPlan.load(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"schema_version {SCHEMA_VERSION + 1} is not supported" in msg


def test_load_without_schema_version_reads_current(tmp_path):
    d = make_plan().to_dict()
    del d["schema_version"]
    assert RegionPlan.load(_write(tmp_path, d)) == make_plan()


@pytest.mark.parametrize("text", ["{not json", "", '{"global_prompt": "g",}', "[" * 100_000, "1" * 5000])
def test_load_malformed_json(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        RegionPlan.load(path)
    assert str(path) in str(info.value)


def test_load_non_utf8_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b'{"global_prompt": "\xff"}')
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        RegionPlan.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope" / "plan.json"
    with pytest.raises(ValueError, match="does not exist") as info:
        RegionPlan.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        RegionPlan.load(tmp_path)  # a directory is not a plan file


def test_load_region_without_bbox_names_path_and_region_number(tmp_path):
    d = make_plan().to_dict()
    del d["regions"][1]["bbox"]
    path = _write(tmp_path, d)
    with pytest.raises(ValueError) as info:
        RegionPlan.load(path)
    msg = str(info.value)
    assert str(path) in msg and "plan region 2" in msg and "has no 'bbox'" in msg


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["regions"][0].update(bbox=[1, 2, 3]), r"plan region 1: a box needs exactly 4 numbers"),
        (lambda d: d["regions"][1].update(bbox=[5, 5, 5, 9]), "plan region 2: region box .* has zero area"),
        (lambda d: d["regions"][0].update(hint=""), "plan region 1: .*non-empty hint"),
        (lambda d: d["regions"][0].update(bbox=5), "plan region 1"),
        (lambda d: d["regions"][0].update(bbox=[1, 2, 3, 10**400]), "plan region 1: box coordinates must be finite"),
        (lambda d: d["regions"].append("x"), "plan region 3: a region must be an object"),
        (lambda d: d.update(regions={"a": 1}), "'regions' must be a list"),
        (lambda d: d.pop("global_prompt"), "has no 'global_prompt'"),
        (lambda d: d.update(global_prompt=5), "global_prompt must be a string"),
        (lambda d: d.update(image_size=[0, 5]), "image_size must be positive"),
    ],
)
def test_load_invalid_content_names_the_file(tmp_path, mutate, match):
    d = make_plan().to_dict()
    mutate(d)
    path = _write(tmp_path, d)
    with pytest.raises(ValueError, match=match) as info:
        RegionPlan.load(path)
    assert str(info.value).startswith(f"plan file {path}: ")


def test_load_json_that_is_not_an_object(tmp_path):
    path = _write(tmp_path, [1, 2])
    with pytest.raises(ValueError, match="a plan must be a JSON object, got list") as info:
        RegionPlan.load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- to_response
@pytest.mark.parametrize(
    "plan",
    [
        make_plan(),
        make_plan(regions=()),
        make_plan(global_prompt="", reasoning=""),
        make_plan(global_prompt='a "quoted" 苹果', regions=(Region((1, 2, 3, 4), 'say "hi" \\ ]} </region'),)),
        parse_plan(OFFICIAL, (224, 224)),
        parse_plan(OFFICIAL, (4000, 3000), planner_size=(1008, 756)),
    ],
    ids=["full", "no-regions", "empty-prompt", "escapes", "official", "planner-frame"],
)
def test_to_response_reparses_to_the_same_plan_in_strict_mode(plan):
    text = plan.to_response()
    again = parse_plan(text, plan.image_size, strict=True)
    same_content(again, plan)
    assert again.repairs == ()
    assert again.raw_text == text


def test_to_response_of_official_example_matches_grammar():
    plan = parse_plan(OFFICIAL)
    text = plan.to_response()
    assert text.startswith("<think>Reasoning process</think><gen_image>Global edit instruction</gen_image><region>[")
    assert text.endswith("]</region>")
    items = json.loads(text[text.index("<region>") + 8 : -len("</region>")])
    assert items == [
        {"bbox_2d": [10, 150, 150, 210], "point_2d": [30, 175], "hint": "change the color of this one apple to blue"},
        {"bbox_2d": [150, 50, 200, 150], "point_2d": [175, 75], "hint": "keep this one apple unchanged"},
    ]


# ---------------------------------------------------------------------------------------------- size checks
def test_check_image():
    plan = make_plan()
    plan.check_image((400, 300))
    plan.check_image([400, 300])
    make_plan(image_size=None).check_image((1, 1))  # no size recorded: nothing to check
    with pytest.raises(ValueError) as info:
        plan.check_image((800, 600))
    msg = str(info.value)
    assert "400x300" in msg and "800x600" in msg
    assert "rescaled" in msg and "plan.rescaled((800, 600))" in msg
    with pytest.raises(ValueError, match="rescaled"):
        plan.check_image((300, 400))  # transposed


def test_rescaled_maps_boxes_and_points_exactly():
    plan = RegionPlan(
        "g",
        (Region((400, 300, 2000, 1500), "a", (1000, 600)), Region((0, 0, 4000, 3000), "all")),
        image_size=(4000, 3000),
        repairs=("kept",),
    )
    small = plan.rescaled((1000, 750))
    assert small.boxes == [(100.0, 75.0, 500.0, 375.0), (0.0, 0.0, 1000.0, 750.0)]
    assert small.regions[0].point == (250.0, 150.0) and small.regions[1].point is None
    assert small.hints == ["a", "all"]
    assert small.image_size == (1000, 750)
    assert small.repairs == ("kept",) and small.global_prompt == "g"
    small.check_image((1000, 750))
    small.validate()
    # anisotropic
    wide = plan.rescaled((8000, 1500))
    assert wide.boxes == [(800.0, 150.0, 4000.0, 750.0), (0.0, 0.0, 8000.0, 1500.0)]
    assert plan.boxes[0] == (400.0, 300.0, 2000.0, 1500.0)  # the original is unchanged


def test_rescaled_whole_image_box_stays_on_the_border_for_many_sizes():
    for w in range(28, 2000, 28):
        plan = RegionPlan("g", (Region((0, 0, w, w), "all"),), image_size=(w, w))
        for dst in (300, 1000, 3000, 4032, 5472):
            out = plan.rescaled((dst, dst))
            assert out.boxes == [(0.0, 0.0, float(dst), float(dst))]
            out.validate()


def test_rescaled_needs_image_size():
    with pytest.raises(ValueError, match="cannot rescale a plan without image_size"):
        make_plan(image_size=None).rescaled((10, 10))


def test_clipped_records_repairs():
    plan = RegionPlan(
        "g",
        (
            Region((-10, 20, 250, 120), "partly"),
            Region((10, 10, 20, 20), "inside"),
            Region((300, 10, 400, 50), "outside"),
            Region((200, 0, 220, 50), "on the edge"),
        ),
        repairs=("earlier",),
    )
    out = plan.clipped((200, 100))
    assert out.boxes == [(0.0, 20.0, 200.0, 100.0), (10.0, 10.0, 20.0, 20.0)]
    assert out.hints == ["partly", "inside"]
    assert out.image_size == (200, 100)
    assert out.repairs == (
        "earlier",
        "region 1: box [-10, 20, 250, 120] clipped to [0, 20, 200, 100]",
        "region 3: box [300, 10, 400, 50] lies outside the 200x100 image; dropped",
        "region 4: box [200, 0, 220, 50] lies outside the 200x100 image; dropped",
    )
    out.validate()
    assert out.clipped() == out  # idempotent, nothing more recorded


def test_clipped_uses_own_size_and_needs_one():
    plan = RegionPlan("g", (Region((0, 0, 500, 50), "a"),), image_size=(100, 100))
    assert plan.clipped().boxes == [(0.0, 0.0, 100.0, 50.0)]
    with pytest.raises(ValueError, match="clipping needs the image size"):
        RegionPlan("g", (Region((0, 0, 5, 5), "a"),)).clipped()


def test_validate():
    make_plan().validate()
    make_plan(image_size=None).validate()  # nothing to check against
    # partly outside is valid: the editor expands the raw box and clamps afterwards (official)
    RegionPlan("g", (Region((190, 50, 201, 60), "edge"), Region((-1, 0, 10, 10), "neg")), image_size=(200, 100)
               ).validate()
    plan = RegionPlan("g", (Region((0, 0, 10, 10), "in"), Region((200, 50, 260, 60), "out")), image_size=(200, 100))
    with pytest.raises(ValueError) as info:
        plan.validate()
    msg = str(info.value)
    assert "region 2 box [200, 50, 260, 60] lies outside the 200x100 image" in msg and "plan.rescaled" in msg
    plan.validate((300, 300))  # an explicit size wins
    with pytest.raises(ValueError, match="region 1 .* outside the 5x5 image"):
        RegionPlan("g", (Region((6, 6, 9, 9), "a"),)).validate((5, 5))


def test_expand_then_clamp_issue_example():
    # issue 12 item 7: 640x480, box [-30, 100, 200, 300], expand 0.15, FLUX.1 Kontext → [0, 70, 234, 330] = 840 patches
    from replan.backbones.flux_kontext import kontext_resolution
    from replan.coords import box_to_patch_mask
    from replan.parse import parse_plan

    for mode in ("lenient", "strict", "official"):
        plan = parse_plan('<think>t</think><gen_image>g</gen_image><region>[{"bbox_2d": [-30, 100, 200, 300], '
                          '"hint": "h"}]</region>', (640, 480), mode=mode)
        assert plan.boxes == [(-30.0, 100.0, 200.0, 300.0)]  # the raw box is kept
        # dx = 230 * 0.15 = 34.5, dy = 200 * 0.15 = 30: [-64.5, 70, 234.5, 330] → clamp → int
        assert plan.expanded_boxes(0.15) == [(0, 70, 234, 330)]
    w, h = kontext_resolution((640, 480))
    assert (w, h) == (1184, 880)
    # cols 0 … ceil(234 * 1.85 / 16) = 28, rows floor(70 * 11/6 / 16) = 8 … ceil(330 * 11/6 / 16) = 38: 28 x 30
    patches = box_to_patch_mask((0, 70, 234, 330), (640, 480), (h // 16, w // 16))
    assert int(patches.sum()) == 840
    clipped_first = RegionPlan("g", (Region((0, 100, 200, 300), "h"),), image_size=(640, 480))  # the old order
    assert clipped_first.expanded_boxes(0.15) == [(0, 70, 230, 330)]
    assert int(box_to_patch_mask((0, 70, 230, 330), (640, 480), (h // 16, w // 16)).sum()) == 810


def test_expanded_box_entirely_outside_covers_no_patch():
    plan = RegionPlan("g", (Region((700, 10, 800, 50), "gone"),), image_size=(640, 480))
    (box,) = plan.expanded_boxes(0.15)  # [685, 4, 815, 56] → clamped: x1 = 685 > x2 = 640
    assert box == (685, 4, 640, 56)
    from replan.coords import box_to_patch_mask

    assert not box_to_patch_mask(box, (640, 480), (30, 40)).any()
    # a box just past the border is pulled in by its expansion, as official: dx = 15, dy = 13.5
    near = RegionPlan("g", (Region((645, 10, 745, 100), "near"),), image_size=(640, 480))
    assert near.expanded_boxes(0.15) == [(630, 0, 640, 113)]  # [630, -3.5, 760, 113.5] → clamp → int
    assert int(box_to_patch_mask((630, 0, 640, 113), (640, 480), (30, 40)).sum()) == 8  # col 39, rows 0-7


def test_expanded_boxes_official_worked_example():
    plan = RegionPlan("g", (Region((100, 50, 300, 250), "a"),), image_size=(800, 600))
    assert plan.expanded_boxes(0.15) == [(70, 20, 330, 280)]
    assert plan.expanded_boxes(0.15, "ratio") == [(70, 20, 330, 280)]
    assert all(type(v) is int for v in plan.expanded_boxes(0.15)[0])
    assert plan.expanded_boxes(0) == [(100, 50, 300, 250)]


def test_expanded_boxes_clamped_and_truncated():
    plan = RegionPlan(
        "g",
        (Region((10, 20, 110, 70), "near corner"), Region((700.7, 500.9, 790.2, 590.6), "floats")),
        image_size=(800, 600),
    )
    # dx = 100 * 0.5 = 50, dy = 50 * 0.5 = 25 → clamped at 0; second: dx = 44.75, dy = 44.85 → clamped at 800/600
    assert plan.expanded_boxes(0.5) == [(0, 0, 160, 95), (655, 456, 800, 600)]
    # 0.1: dx = 8.95, dy = 8.97 → int() truncates 691.75 → 691, 491.93 → 491, 799.15 → 799, 599.57 → 599
    assert plan.expanded_boxes(0.1)[1] == (691, 491, 799, 599)


def test_expanded_boxes_pixels_mode():
    plan = RegionPlan("g", (Region((100, 50, 300, 250), "a"), Region((5, 5, 20, 20), "b")), image_size=(800, 600))
    assert plan.expanded_boxes(25, "pixels") == [(75, 25, 325, 275), (0, 0, 45, 45)]
    assert plan.expanded_boxes(1000, mode="pixels") == [(0, 0, 800, 600)] * 2
    assert plan.expanded_boxes(10, "pixels", image_size=(30, 30))[1] == (0, 0, 30, 30)


def test_expanded_boxes_errors():
    plan = RegionPlan("g", (Region((100, 50, 300, 250), "a"),), image_size=(800, 600))
    with pytest.raises(ValueError, match="expand mode must be 'ratio' or 'pixels'"):
        plan.expanded_boxes(0.1, "percent")
    with pytest.raises(ValueError, match="expand value must be >= 0"):
        plan.expanded_boxes(-0.1)
    with pytest.raises(ValueError, match="needs the image size"):
        RegionPlan("g", plan.regions).expanded_boxes(0.1)
    assert RegionPlan("g", plan.regions).expanded_boxes(0.15, image_size=(800, 600)) == [(70, 20, 330, 280)]


# ==================================================================================================== overlay
GREY = (90, 100, 110)


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before.convert("RGB")) != np.asarray(after), axis=-1)


def test_draw_overlay_changes_only_outlines_and_labels():
    image = Image.new("RGB", (400, 300), GREY)
    regions = (Region((100, 120, 200, 220), "one"), Region((250, 20, 380, 100), "two"))
    plan = RegionPlan("g", regions, image_size=(400, 300))
    out = draw_overlay(image, plan)
    assert out.mode == "RGB" and out.size == image.size
    assert out is not image and image.getpixel((100, 150)) == GREY  # input untouched
    changed = _changed(image, out)
    # on the outlines
    for xy in [(100, 170), (199, 170), (150, 120), (150, 219), (250, 60), (379, 60), (300, 99)]:
        assert changed[xy[1], xy[0]], xy
    assert out.getpixel((100, 170)) == (0x00, 0xD2, 0x6A)  # first colour
    assert out.getpixel((379, 60)) == (0xFF, 0x3B, 0x30)  # second colour
    # far from every box and label
    for xy in [(5, 295), (395, 295), (20, 150), (230, 270), (50, 10)]:
        assert not changed[xy[1], xy[0]], xy
    # box interiors away from the outlines and the label stay untouched
    assert not changed[150:215, 105:195].any()
    assert not changed[60:95, 255:375].any()
    # every change is near a box: within its outline band or its label just above / inside the top edge
    ys, xs = np.nonzero(changed)
    near = np.zeros_like(changed)
    for x1, y1, x2, y2 in plan.boxes:
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        near[max(0, y1 - 40) : y2 + 1, x1 : min(400, x2 + 120)] = True
    assert near[ys, xs].all()


def test_draw_overlay_with_explicit_boxes_and_other_modes():
    image = Image.new("RGBA", (320, 240), (*GREY, 255))
    plan = RegionPlan("g", (Region((10, 10, 50, 50), "a"),), image_size=(320, 240))
    out = draw_overlay(image, plan, boxes=[(100, 100, 300, 200)], width=4)
    assert out.mode == "RGB" and out.size == (320, 240)
    changed = _changed(image, out)
    assert changed[150, 100] and changed[150, 103] and not changed[150, 104 + 2]
    assert not changed[40:55, 20:45].any()  # the plan's own box is not drawn


def test_draw_overlay_without_regions_is_an_unchanged_copy():
    image = Image.new("L", (100, 80), 128)
    out = draw_overlay(image, RegionPlan(""))
    assert out.mode == "RGB" and out.size == (100, 80)
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


def test_draw_overlay_long_hint_and_box_at_top_edge():
    image = Image.new("RGB", (640, 480), GREY)
    plan = RegionPlan("g", (Region((0, 0, 640, 480), "x" * 500),), image_size=(640, 480))
    out = draw_overlay(image, plan)
    changed = _changed(image, out)
    assert changed[0, 320] and changed[240, 0] and changed[479, 320] and changed[240, 639]
    assert not changed[200:300, 300:400].any()


def test_draw_overlay_draws_boxes_sticking_out_clipped_and_skips_boxes_outside():
    image = Image.new("RGB", (200, 100), GREY)
    plan = RegionPlan("g", (Region((-30, 20, 80, 140), "partly"), Region((300, 10, 400, 50), "gone")),
                      image_size=(200, 100))
    out = draw_overlay(image, plan, width=2)
    same = draw_overlay(image, RegionPlan("g", (Region((0, 20, 80, 100), "partly"),), image_size=(200, 100)), width=2)
    assert np.array_equal(np.asarray(out), np.asarray(same))  # drawn as its clipped box; the outside box not at all
    inverted = draw_overlay(image, plan, boxes=[(0, 0, 90, 90), (685, 4, 640, 56)], width=2)  # expanded, clamped
    assert _changed(image, inverted)[45, 0]


def test_to_response_keeps_tag_text_in_hints_and_refuses_it_elsewhere():
    from replan.parse import parse_plan

    plan = RegionPlan("", (Region((1, 1, 5, 5), "x </region> <y>"),), image_size=(64, 48))
    assert parse_plan(plan.to_response(), (64, 48), strict=True).regions[0].hint == "x </region> <y>"
    with pytest.raises(ValueError, match="gen_image"):
        RegionPlan("a </gen_image> b").to_response()


@pytest.mark.parametrize("data, match", [
    ({"global_prompt": "x", "repairs": "abc"}, "repairs"),
    ({"global_prompt": "x", "reasoning": 5}, "reasoning"),
    ({"global_prompt": "x", "image_size": [1]}, "image_size"),
])
def test_from_dict_checks_field_types(data, match):
    with pytest.raises(ValueError, match=match):
        RegionPlan.from_dict(data)
