"""Mask-shaped regions: plan schema (RLE), patch masks (boxes are the rectangle case) and exact locality."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from replan.backbones import load_editor
from replan.coords import box_to_patch_mask, mask_to_patch_mask, pixel_mask_to_patch_mask
from replan.plan import Region, RegionPlan, draw_overlay, mask_to_rle, rle_to_mask

SMALL = {"max_area": 128 * 128}
FAST = {"max_sequence_length": 16}
SIZE = (200, 150)  # (W, H)


def make_image(size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def l_mask(size=SIZE):
    m = np.zeros((size[1], size[0]), dtype=bool)
    m[10:140, 10:60] = True  # vertical bar
    m[100:140, 10:190] = True  # horizontal foot
    return m


def disk_mask(size=SIZE, centre=(100, 70), radius=45):
    yy, xx = np.mgrid[: size[1], : size[0]]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def one_block_editor(tiny_kontext_one_block_dir):
    ed = load_editor("flux_kontext", str(tiny_kontext_one_block_dir), device="cpu", editor_kwargs=SMALL)
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


# ------------------------------------------------------------------------------------------------ schema
def test_from_mask_box_is_the_bounding_box():
    r = Region.from_mask(l_mask(), "a snake")
    assert r.bbox == (10.0, 10.0, 190.0, 140.0)
    assert r.mask.shape == (150, 200) and r.mask.dtype == bool and not r.mask.flags.writeable
    with pytest.raises(ValueError, match="bounding box"):
        Region((0, 0, 50, 50), "x", mask=l_mask())
    with pytest.raises(ValueError, match="empty"):
        Region.from_mask(np.zeros((4, 4), bool), "x")
    with pytest.raises(ValueError, match="2-D"):
        Region.from_mask(np.ones((2, 3, 4), bool), "x")


@pytest.mark.parametrize("mask", [l_mask(), disk_mask(), np.ones((3, 5), bool), np.eye(7, dtype=bool)])
def test_rle_round_trip(mask):
    rle = mask_to_rle(mask)
    assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
    assert np.array_equal(rle_to_mask(json.loads(json.dumps(rle))), mask)


def test_plan_json_round_trip_with_masks(tmp_path):
    plan = RegionPlan("x", (Region.from_mask(disk_mask(), "a ball"), Region((5, 5, 30, 30), "a cat", (10, 10))),
                      image_size=SIZE)
    d = plan.to_dict()
    assert "mask" in d["regions"][0] and "mask" not in d["regions"][1]
    assert len(json.dumps(d["regions"][0]["mask"])) < 2000  # compact: runs, not pixels
    back = RegionPlan.load(plan.save(tmp_path / "p.json"))
    assert back == plan and np.array_equal(back.regions[0].mask, disk_mask())
    changed = RegionPlan("x", (Region.from_mask(disk_mask(radius=44), "a ball"), plan.regions[1]), image_size=SIZE)
    assert changed != plan
    # old plans (no masks) still read
    old = {"schema_version": 1, "global_prompt": "g", "regions": [{"bbox": [1, 2, 3, 4], "hint": "h"}]}
    assert RegionPlan.from_dict(old).regions[0].mask is None


@pytest.mark.parametrize("bad", [{"size": [2, 2], "counts": [1, 1]}, {"size": [2], "counts": [4]},
                                 {"counts": [4]}, {"size": [2, 2], "counts": [-1, 5]}, "rle"])
def test_bad_rle_is_a_clear_error(bad):
    d = {"global_prompt": "g", "regions": [{"bbox": [0, 0, 2, 2], "hint": "h", "mask": bad}]}
    with pytest.raises(ValueError, match="plan region 1: .*mask"):
        RegionPlan.from_dict(d)


def test_mask_image_size_mismatch_is_a_clear_error(one_block_editor):
    r = Region.from_mask(disk_mask((100, 80), (50, 40), 20), "a ball")
    with pytest.raises(ValueError, match="80x100 mask but the image is 100x81|100x80 mask but the image is 100x81"):
        RegionPlan("x", (r,), image_size=(100, 81))
    plan = RegionPlan("x", (r,))
    with pytest.raises(ValueError, match="mask but the image is 200x150"):
        one_block_editor.edit(make_image(), plan, steps=1, **FAST)


def test_rescaled_resizes_the_mask():
    plan = RegionPlan("x", (Region.from_mask(l_mask(), "a snake"),), image_size=SIZE)
    big = plan.rescaled((400, 300))
    assert big.regions[0].mask.shape == (300, 400) and big.regions[0].bbox == (20.0, 20.0, 380.0, 280.0)


def test_overlay_tints_the_mask_only():
    image = Image.new("RGB", SIZE, (0, 0, 0))
    m = disk_mask()
    out = np.asarray(draw_overlay(image, RegionPlan("x", (Region.from_mask(m, "a ball"),), image_size=SIZE)))
    assert out[70, 100].any()  # inside: tinted
    assert not out[140, 195].any()  # outside the mask (and its label): untouched
    assert not out[20, 60].any()  # inside the bounding box but outside the disk: no rectangle drawn


# ------------------------------------------------------------------------------------------------ patch masks
@pytest.mark.parametrize("size,grid", [((200, 150), (8, 8)), ((37, 53), (5, 3)), ((128, 128), (8, 8))])
def test_rectangular_mask_equals_box_patch_mask(size, grid):
    rng = np.random.default_rng(1)
    for _ in range(20):
        x1, x2 = sorted(rng.choice(size[0] + 1, 2, replace=False))
        y1, y2 = sorted(rng.choice(size[1] + 1, 2, replace=False))
        m = np.zeros((size[1], size[0]), bool)
        m[y1:y2, x1:x2] = True
        assert torch.equal(mask_to_patch_mask(m, size, grid), box_to_patch_mask((x1, y1, x2, y2), size, grid))


def test_mask_in_the_grid_frame_matches_pixel_mask_to_patch_mask():
    m = disk_mask((128, 96), (60, 40), 30)
    assert torch.equal(mask_to_patch_mask(m, (128, 96), (6, 8)), pixel_mask_to_patch_mask(torch.from_numpy(m), (6, 8)))


def test_outward_rounding_keeps_thin_masks():
    m = np.zeros((150, 200), bool)
    m[:, 101] = True  # one pixel column
    pm = mask_to_patch_mask(m, (200, 150), (8, 8))
    assert pm.any(dim=0).sum() >= 1 and pm.all(dim=0).sum() >= 1


# ------------------------------------------------------------------------------------------------ locality
def noise_prediction(editor, plan, image):
    captured = []
    hook = editor.pipe.transformer.register_forward_hook(lambda m, a, out: captured.append(out[0].detach().clone()))
    try:
        result = editor.edit(image, plan, steps=1, seed=0, switch=0.0, **FAST)
    finally:
        hook.remove()
    return captured[0][0, : result.layout.noise_grid.size], result


@pytest.mark.parametrize("mask_fn", [l_mask, disk_mask])
def test_hint_changes_only_the_mask_patches(one_block_editor, mask_fn):
    image, mask = make_image(), mask_fn()
    other_box = Region((150, 5, 195, 40), "a dog")
    plan = RegionPlan("make it warmer", (Region.from_mask(mask, "a red cat"), other_box))
    base, result = noise_prediction(one_block_editor, plan, image)
    changed = RegionPlan(plan.global_prompt, (Region.from_mask(mask, "a blue bird"), other_box))
    other, _ = noise_prediction(one_block_editor, changed, image)

    layout = result.layout
    T, P = layout.text_len, layout.noise_grid.size
    grid = (layout.noise_grid.height, layout.noise_grid.width)
    inside = layout.region_token_mask(1, ("noise",))[T : T + P]
    assert torch.equal(inside, mask_to_patch_mask(mask, SIZE, grid).flatten())
    in_box = box_to_patch_mask(plan.regions[0].bbox, SIZE, grid).flatten()
    assert (in_box & ~inside).any(), "the mask must leave part of its bounding box out"
    assert result.boxes[0] == plan.regions[0].bbox  # masks are not expanded; the box region is
    assert result.boxes[1] != other_box.bbox

    assert torch.equal(base[~inside], other[~inside]), "patches outside the mask (incl. its bounding box) changed"
    assert ((base - other).abs().amax(-1)[inside] > 1e-6).all(), "every patch of the mask sees its hint"
