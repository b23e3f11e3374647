"""The attention memory budget: costs by hand, automatic hint-padding trimming, and hostile plans refused before any
model work (Python API and CLI; the server's 413 is in test_serve.py)."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from replan.attention import AttentionBudgetError, attention_cost, parse_bytes
from replan.attention.budget import LayoutSize, check_budget, default_budget
from replan.backbones import load_editor
from replan.plan import Region, RegionPlan

TWO = RegionPlan("make it warmer", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))


def make_image(size=(200, 150)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def many_regions(n: int, size=(200, 150), seed: int = 0) -> RegionPlan:
    rng = random.Random(seed)
    regions = []
    for i in range(n):
        x, y = rng.uniform(0, size[0] - 12), rng.uniform(0, size[1] - 12)
        regions.append(Region((round(x), round(y), round(x) + 10, round(y) + 10), f"a cat {i}"))
    return RegionPlan("make it warmer", tuple(regions), image_size=size)


@pytest.fixture(scope="module")
def editor(tiny_kontext_dir):
    ed = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs={"max_area": 128 * 128})
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


# ------------------------------------------------------------------------------------------------ arithmetic
def test_costs_by_hand():
    assert attention_cost(1000, 10, "dense", torch.bfloat16).mask == 1000 * 1000 * 2
    dense = attention_cost(1000, 10, "dense", torch.float32)
    assert (dense.mask, dense.work, dense.build, dense.total) == (4_000_000, 0, 20_000, 4_020_000)
    flex = attention_cost(1000, 10, "flex", heads=24, compiled=True)  # 8 blocks of 128: 4 int32 tables of 8x8
    assert (flex.mask, flex.work) == (4 * 8 * 8 * 4 + 16 * 1000, 0)
    eager = attention_cost(1000, 10, "flex", heads=24, compiled=False)  # eager flex materialises the scores
    assert eager.work == 2 * 24 * 1000 * 1000 * 4


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2e9") == 2e9
    assert parse_bytes(None) is None and parse_bytes(1234) == 1234
    for bad in ("lots", "-1GB", "0", 0, "12 parsecs"):
        with pytest.raises(ValueError, match="attention budget"):
            parse_bytes(bad)
    assert default_budget("cpu") > 0


def test_check_budget_decisions_and_message():
    padded = LayoutSize(regions=1000, main=512, hints=512_000, image=8192, groups=3003)
    trimmed = LayoutSize(regions=1000, main=512, hints=5_000, image=8192, groups=3003)
    kw = dict(backend="dense", dtype=torch.bfloat16, heads=24, compiled=False)
    assert check_budget(padded, None, **kw) is False  # no budget: no check
    assert check_budget(trimmed, 10**9, **kw) is False  # fits as it is
    assert check_budget(padded, 10**9, trimmed=trimmed, **kw) is True  # only the trimmed layout fits
    with pytest.raises(AttentionBudgetError, match="allow hint-padding trimming") as e:
        check_budget(padded, 10**9, trimmed=trimmed, trim_allowed=False, **kw)
    with pytest.raises(AttentionBudgetError) as e:
        check_budget(padded, 10**8, trimmed=trimmed, **kw)
    message = str(e.value)
    assert "\n" not in message and message.startswith("the plan's 1000 region(s) make a 520,704-token")
    for part in ("13,704 tokens", "fewer regions", "--attention flex --compile", "--attention_budget", "100.0 MB"):
        assert part in message, part


# ------------------------------------------------------------------------------------------------ editor
def test_hint_padding_trimmed_only_when_the_padded_layout_is_over_budget(editor):
    image, options = make_image(), dict(steps=1, seed=0, switch=0.0, max_sequence_length=64)
    padded = editor.edit(image, TWO, trim_hint_padding=False, **options)
    trimmed = editor.edit(image, TWO, trim_hint_padding=True, **options)
    assert padded.layout.text_len == 3 * 64 and trimmed.layout.text_len < padded.layout.text_len
    assert not padded.extras and not trimmed.extras
    groups = len(padded.layout.group_names())
    padded_cost, trimmed_cost = (attention_cost(r.layout.total_len, groups, "dense", torch.float32).total
                                 for r in (padded, trimmed))
    between = (padded_cost + trimmed_cost) // 2

    auto = editor.edit(image, TWO, attention_budget=between, **options)
    assert auto.layout.text_len == trimmed.layout.text_len
    assert auto.extras["hint_padding"].startswith(f"trimmed: the padded layout ({padded.layout.total_len} tokens)")
    assert np.array_equal(np.asarray(auto.image), np.asarray(trimmed.image))
    roomy = editor.edit(image, TWO, attention_budget=padded_cost + 1, **options)  # fits: official padding kept
    assert roomy.layout.text_len == padded.layout.text_len and not roomy.extras
    with pytest.raises(AttentionBudgetError, match="allow hint-padding trimming"):
        editor.edit(image, TWO, attention_budget=between, trim_hint_padding=False, **options)
    with pytest.raises(AttentionBudgetError, match="region\\(s\\) make a"):
        editor.edit(image, TWO, attention_budget=trimmed_cost - 1, **options)


def test_editor_default_budget_can_be_set_once(editor):
    editor.attention_budget = 1000
    try:
        with pytest.raises(AttentionBudgetError, match="over the 1.0 kB attention budget"):
            editor.edit(make_image(), TWO, steps=1, max_sequence_length=16)
        editor.edit(make_image(), RegionPlan("no regions: no masks, no check"), steps=1, max_sequence_length=16)
    finally:
        editor.attention_budget = None


class ForwardCounter:
    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self.count) for m in modules]

    def count(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_hostile_plan_is_refused_before_any_model_work(editor):
    plan = many_regions(1000)
    pipe = editor.pipe
    with ForwardCounter(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae) as counter:
        with pytest.raises(AttentionBudgetError) as e:
            editor.edit(make_image(), plan, steps=1, attention_budget="64MB")
    assert counter.calls == 0
    message = str(e.value)
    assert message.startswith("the plan's 1000 region(s) make a 512,620-token attention layout")  # 512 x 1001 + 108
    assert "even without hint padding" in message and "--attention_budget" in message


@pytest.mark.slow
def test_hundreds_of_regions_run_when_the_trimmed_layout_fits(editor):
    """No region limit: 200 regions, padded (25.8k tokens, 2.7 GB of mask) over a 512 MB budget, run trimmed."""
    plan = many_regions(200)
    result = editor.edit(make_image(), plan, steps=1, switch=0.5, attention_budget="512MB", max_sequence_length=128)
    assert result.layout.num_regions == 200 and "(25,836 tokens)" in result.extras["hint_padding"]
    assert result.layout.total_len < 128 + 200 * 10 + 108 and result.image.size == (200, 150)


def test_dense_mask_build_has_no_l2_intermediate_beyond_the_mask():
    """Peak memory of building a 6k-token additive mask (and its membership): the mask plus a small margin."""
    code = """
import resource, random, torch
from replan.attention import GroupMembership, TokenLayout, additive_mask, default_rules
rng = random.Random(0)
boxes = [(x, y, x + 40, y + 40) for x, y in ((rng.uniform(0, 600), rng.uniform(0, 600)) for _ in range(60))]
layout = TokenLayout.build(512, [60] * 60, (40, 40), [(40, 40)]).with_box_regions(boxes, (640, 640))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mask = additive_mask(GroupMembership.from_layout(layout), default_rules(60), torch.float32)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(mask.numel() * mask.element_size(), grown)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    mask_bytes, grown = (int(v) for v in out.stdout.split())
    assert mask_bytes == (512 + 3600 + 3200) ** 2 * 4
    assert grown < 1.2 * mask_bytes + 32 * 2**20, (grown, mask_bytes)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_refuses_a_1000_region_plan_with_one_line(tmp_path):
    image_path, plan_path = tmp_path / "in.png", tmp_path / "plan.json"
    make_image().save(image_path)
    many_regions(1000).save(plan_path)
    code = ("import resource, sys; from replan.infer import main; rc = main(sys.argv[1:]); "
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr); "
            "sys.exit(rc)")
    out = subprocess.run(
        [sys.executable, "-c", code, "--backbone", "tiny", "--image", str(image_path), "--plan", str(plan_path),
         "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--attention_budget", "64MB"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith(("error:", "maxrss"))]
    assert len(lines) == 2 and lines[0].startswith("error: the plan's 1000 region(s) make a"), out.stderr[-2000:]
    assert "--attention_budget" in lines[0]
    assert int(lines[1].split()[1]) < 3 * 2**30  # the padded layout would need about a terabyte
    assert not (tmp_path / "out").exists()


def test_cli_records_automatic_trimming(tmp_path):
    image_path, plan_path = tmp_path / "in.png", tmp_path / "plan.json"
    make_image().save(image_path)
    TWO.save(plan_path)
    from replan.infer import main

    args = ["--backbone", "tiny", "--image", str(image_path), "--plan", str(plan_path), "--device", "cpu",
            "--steps", "1", "--attention_budget", "5MB", "--output_dir"]
    assert main(args + [str(tmp_path / "a")]) == 0  # 2 x 512 padded hint tokens: ~10 MB; trimmed: ~1 MB
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["resolved"]["hint_padding"].startswith("trimmed: the padded layout")
    assert "--trim_hint_padding" in config["replay"] and config["attention_budget"] == "5MB"
    assert main(args[:-3] + ["--attention_budget", "5MB", "--no-trim_hint_padding", "--output_dir",
                             str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_fit_hint_padding_modes():
    from replan.attention.budget import fit_hint_padding

    padded = LayoutSize(regions=2, main=512, hints=1024, image=8192, groups=9)
    trimmed = LayoutSize(regions=2, main=512, hints=16, image=8192, groups=9)
    kw = dict(backend="dense", dtype=torch.bfloat16, heads=24, compiled=False)
    roomy, between = 10**9, attention_cost(9000, 9, "dense", torch.bfloat16).total
    assert fit_hint_padding(padded, trimmed, roomy, None, **kw) == (False, None)  # official padding kept
    assert fit_hint_padding(padded, trimmed, roomy, True, **kw) == (True, None)  # asked for
    trim, note = fit_hint_padding(padded, trimmed, between, None, **kw)
    assert trim and note.startswith("trimmed: the padded layout (9,728 tokens)") and "8,720 tokens" in note
    with pytest.raises(AttentionBudgetError):
        fit_hint_padding(padded, trimmed, between, False, **kw)
    assert fit_hint_padding(padded, None, roomy, True, **kw) == (True, None)  # nothing to trim (Qwen): no-op
