"""The app's callbacks without a browser: plan ↔ boxes, the attention matrix, the mask preview, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from replan.app.callbacks import (
    AppError,
    annotator_to_plan,
    as_image,
    default_matrix,
    mask_preview,
    matrix_groups,
    matrix_headers,
    matrix_to_rules,
    plan_to_annotator,
    resize_matrix,
)
from replan.attention import default_rules
from replan.plan import Region, RegionPlan

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
PLAN = RegionPlan("warm", (Region((10, 10, 60, 50), "a cat"), Region((80, 40, 150, 110), "a dog")),
                  image_size=(160, 120))


def test_plan_round_trips_through_the_annotator():
    value = plan_to_annotator(IMAGE, PLAN)
    assert [b["label"] for b in value["boxes"]] == ["a cat", "a dog"]
    plan, notes = annotator_to_plan(value, "warm")
    assert plan.boxes == PLAN.boxes and plan.hints == PLAN.hints and notes == []


def test_boxes_partly_outside_are_kept_raw_and_bad_boxes_left_out():
    value = {"image": np.asarray(IMAGE), "boxes": [
        {"xmin": -20, "ymin": 100, "xmax": 40, "ymax": 140, "label": "a cat"},  # past the corner: expand, then clamp
        {"xmin": 50, "ymin": 50, "xmax": 90, "ymax": 90, "label": "  "},  # no hint
        {"xmin": 70, "ymin": 20, "xmax": 70, "ymax": 60, "label": "flat"},  # no area
        {"xmin": 90, "ymin": 80, "xmax": 30, "ymax": 10, "label": "swapped"},  # corners swapped by a resize
        {"xmin": 170, "ymin": 10, "xmax": 200, "ymax": 30, "label": "gone"},  # nothing inside the image
    ]}
    plan, notes = annotator_to_plan(value, "")
    assert plan.boxes == [(-20, 100, 40, 140), (30, 10, 90, 80)]
    assert plan.expanded_boxes(0.15) == [(0, 94, 49, 120), (21, 0, 99, 90)]  # dx 9, dy 6 / dx 9, dy 10.5
    assert any("no hint" in n for n in notes) and any("no area" in n for n in notes)
    assert any("box 5 lies outside the image" in n for n in notes)
    preview = mask_preview(IMAGE, plan, default_rules(2), (7, 10), False, 0.15)  # draws the clamped boxes
    assert preview.size == IMAGE.size


@pytest.mark.parametrize("value, message", [
    (None, "Upload an image"),
    ({"image": None, "boxes": []}, "Upload an image"),
    ({"image": np.zeros((40, 40, 3), np.uint8), "boxes": []}, "at least 64"),
    ({"image": np.asarray(IMAGE), "boxes": [{"xmin": 1, "ymin": 1, "label": "x"}]}, "incomplete"),
])
def test_bad_annotator_values(value, message):
    with pytest.raises(AppError, match=message):
        annotator_to_plan(value, "")


def test_too_large_image_is_refused():
    with pytest.raises(AppError, match="MP"):
        as_image(Image.new("RGB", (5000, 4000)))


@pytest.mark.parametrize("has_imgp", [False, True])
def test_default_matrix_is_the_official_locality_rules(has_imgp):
    rows = default_matrix(2, has_imgp)
    groups = matrix_groups(2, has_imgp)
    assert [r[0] for r in rows] == matrix_headers(2, has_imgp)[1:]
    expected = default_rules(2, split=True, noise_bg_attend_noise_bbox=False, has_image_prompt=has_imgp)
    assert matrix_to_rules(rows, 2, has_imgp).matrix(groups).equal(expected.matrix(groups))
    nbg = [r for r in rows if r[0] == "N.BG"][0]
    assert nbg[1 + groups.index("Noise BBox 1")] is False


def test_resize_matrix_keeps_cells_by_name():
    rows = default_matrix(1, False)
    rows[0][1 + matrix_groups(1, False).index("Hint 1")] = True  # Main → H1, off by default
    grown = resize_matrix(rows, 2, False)
    groups = matrix_groups(2, False)
    assert grown[0][1 + groups.index("Hint 1")] is True
    assert grown[0][1 + groups.index("Hint 2")] is False  # new group: default
    assert resize_matrix(None, 1, False) == default_matrix(1, False)


def test_matrix_that_does_not_fit_is_an_error():
    with pytest.raises(AppError, match="Reset matrix"):
        matrix_to_rules(default_matrix(1, False), 2, False)


def test_mask_preview_colours_box_patches_only():
    rules = default_rules(2)
    preview = np.asarray(mask_preview(IMAGE, PLAN, rules, (7, 10), False)).astype(int)
    plain = np.asarray(IMAGE).astype(int)
    grey = np.asarray(Image.blend(IMAGE, Image.new("RGB", IMAGE.size, (128, 128, 128)), 0.55)).astype(int)
    assert np.abs(preview[115, 2] - grey[115, 2]).max() <= 1  # background patch: sees no hint
    assert np.abs(preview[30, 30] - plain[30, 30]).max() > 20  # inside box 1: tinted with its colour


def _fn(demo, name):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


@pytest.fixture(scope="module")
def tiny_pipe():
    pytest.importorskip("gradio")
    from replan.pipeline import RePlanPipeline

    return RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu")


@pytest.fixture(scope="module")
def demo(tiny_pipe):
    from replan.app.ui import build_app

    return build_app(tiny_pipe)


def test_app_callbacks_report_bad_input_instead_of_raising(demo, tmp_path):
    value = plan_to_annotator(IMAGE, PLAN)
    *_, status = _fn(demo, "ai_plan")(None, "x")
    assert "Upload an image" in status
    *_, status = _fn(demo, "ai_plan")(value, "  ")
    assert "Type an instruction" in status
    *_, status = _fn(demo, "ai_plan")(value, "make it warm")
    assert "No planner is loaded" in status
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"global_prompt": "x", "regions": [{"bbox": [5, 5, 5, 9], "hint": "h"}]}))
    *_, status = _fn(demo, "upload_plan")(value, str(bad))
    assert "cannot be used" in status and "region 1" in status


def test_app_run_with_and_without_regions(demo):
    value = plan_to_annotator(IMAGE.resize((160, 128)), RegionPlan("warm", PLAN.regions, image_size=(160, 128)))
    run = _fn(demo, "run")
    matrix = default_matrix(2, False)
    image, overlay, submitted, status = run(value, "warm", matrix, 0.5, 0.15, 2, 2.5, 0, progress=lambda *a, **k: None)
    assert image.size == (160, 128) and "2 region(s)" in status
    assert submitted["plan"]["regions"][0]["hint"] == "a cat" and submitted["switch"] == 0.5
    value["boxes"] = []
    image, _, submitted, status = run(value, "warm", matrix, 0.5, 0.15, 2, 2.5, 0, progress=lambda *a, **k: None)
    assert "stock backbone" in status and submitted["rules"] is None
    assert demo.replan_runs[-1] is submitted
    editor = demo.replan_pipe.editor  # the baseline path is exactly the stock backbone (same prompt, steps, seed)
    w, h = editor.generation_size((160, 128))
    source = Image.fromarray(value["image"])
    stock = editor.pipe(image=editor.pipe.image_processor.resize(source, h, w), prompt="warm", height=h, width=w,
                        max_area=w * h, _auto_resize=False, num_inference_steps=2, guidance_scale=2.5,
                        generator=__import__("torch").Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(stock.resize((160, 128), Image.BICUBIC)))


def test_app_run_shows_the_attention_budget(demo):
    value = plan_to_annotator(IMAGE.resize((160, 128)), RegionPlan("warm", PLAN.regions, image_size=(160, 128)))
    run, editor = _fn(demo, "run"), demo.replan_pipe.editor
    matrix = default_matrix(2, False)
    try:
        editor.attention_budget = 1000  # nothing fits: the message, and the app keeps working
        image, _, _, status = run(value, "warm", matrix, 0.5, 0.15, 2, 2.5, 0, progress=lambda *a, **k: None)
        assert "region(s) make a" in status and "attention budget" in status
        editor.attention_budget = 5 * 10**6  # padded hints (~2k tokens, ~16 MB) over it, trimmed (~4 MB) within
        image, _, _, status = run(value, "warm", matrix, 0.5, 0.15, 2, 2.5, 0, progress=lambda *a, **k: None)
        assert image.size == (160, 128) and "Hint padding trimmed: the padded layout" in status
    finally:
        editor.attention_budget = None


def test_a_dropped_box_does_not_break_run_or_preview(demo):
    value = plan_to_annotator(IMAGE.resize((160, 128)), RegionPlan("warm", PLAN.regions, image_size=(160, 128)))
    value["boxes"].append({"xmin": 5, "ymin": 5, "xmax": 30, "ymax": 30, "label": ""})  # no hint: left out
    _, _, matrix_update = _fn(demo, "on_annotator_change")(value, None)
    matrix = matrix_update["value"]
    assert len(matrix) == len(matrix_groups(2, False))  # sized by the 2 regions that will run, not the 3 boxes
    image, _, submitted, status = _fn(demo, "run")(value, "warm", matrix, 0.5, 0.15, 2, 2.5, 0,
                                                   progress=lambda *a, **k: None)
    assert "2 region(s)" in status and "no hint" in status
    preview, status = _fn(demo, "preview")(value, "warm", matrix, 0.15)
    assert preview is not None and "updated" in status


def test_mask_preview_follows_the_expand_value():
    rules = default_rules(2)
    grey = np.array([128, 128, 128])

    def tinted(expand):
        blank = Image.new("RGB", IMAGE.size, (128, 128, 128))
        out = np.asarray(mask_preview(blank, PLAN, rules, (7, 10), False, expand)).reshape(-1, 3)
        return int((np.abs(out - grey).max(axis=1) > 2).sum())

    assert tinted(0.3) > tinted(0.0)


def test_ai_plan_names_the_prompt_template_that_made_the_plan(tiny_pipe, tmp_path):
    """The planner is the real base class with a fixed reply (the app's note is under test, not a model)."""
    import hashlib

    from replan.app.ui import build_app
    from replan.pipeline import RePlanPipeline
    from replan.planner import Planner, PlannerReply

    class FixedReply(Planner):
        def generate(self, image, prompt):
            return PlannerReply('<think>t</think><gen_image>warm</gen_image><region>[{"bbox_2d": [10, 10, 60, 50], '
                                '"hint": "a cat"}]</region>', image.size)

    template = tmp_path / "my_prompt.txt"
    template.write_text("Plan this edit.\nThe user instruction: ", encoding="utf-8")
    planner = FixedReply(template=template.read_text(encoding="utf-8"), template_name=str(template),
                         box_frame="original")
    app = build_app(RePlanPipeline(tiny_pipe.editor, planner))
    value, prompt, status = _fn(app, "ai_plan")(plan_to_annotator(IMAGE, PLAN), "make it warm")
    digest = hashlib.sha256(template.read_bytes()).hexdigest()
    assert f"Prompt template {template} (sha256 {digest[:12]})" in status and "original frame" in status
    assert [b["label"] for b in value["boxes"]] == ["a cat"] and prompt == "warm"


def test_app_cli_refuses_a_missing_lora_before_loading(capsys):
    pytest.importorskip("gradio")
    from replan.app.__main__ import main

    assert main(["--backbone", "tiny", "--no_planner", "--lora_path", "/no/such/lora"]) == 2
    assert "editor LoRA /no/such/lora does not exist" in capsys.readouterr().err
