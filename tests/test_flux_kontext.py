"""The FLUX.1 Kontext region editor on tiny random components loaded through from_pretrained."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from replan.attention import RegionAttention, TokenLayout, default_schedule
from replan.backbones import load_editor, names, resolve
from replan.backbones.flux_kontext import FluxKontextEditor, kontext_resolution
from replan.plan import Region, RegionPlan

SMALL = {"max_area": 128 * 128}
FAST = {"max_sequence_length": 16}


def make_image(size=(200, 150), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def editor(tiny_kontext_dir):
    ed = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs=SMALL)
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


@pytest.fixture(scope="module")
def one_block_editor(tiny_kontext_one_block_dir):
    ed = load_editor("flux_kontext", str(tiny_kontext_one_block_dir), device="cpu", editor_kwargs=SMALL)
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


TWO_REGIONS = RegionPlan(
    "make it warmer", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog"))
)


def test_registry_names_and_defaults():
    spec = resolve("flux")
    assert spec is resolve("FLUX_KONTEXT") and spec.name == "flux_kontext"
    assert spec.model_id == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (spec.steps, spec.guidance, spec.pipeline_class) == (28, 2.5, "FluxKontextPipeline")
    assert spec.defaults("cli").switch == 0.05 and spec.defaults("app").switch == 0.0
    assert all(spec.defaults(e).expand == 0.15 for e in ("cli", "app", "eval", "server"))
    assert "flux" in names() and "flux_kontext" in names()
    with pytest.raises(ValueError, match="valid names: .*flux_kontext"):
        resolve("stable-diffusion")
    with pytest.raises(ValueError, match="entry point"):
        spec.defaults("web")


def test_loaded_through_from_pretrained(editor):
    assert isinstance(editor, FluxKontextEditor)
    assert isinstance(editor.pipe, FluxKontextPipeline)
    assert editor.pipe.transformer.dtype == torch.float32  # CPU default


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="cannot load FluxKontextPipeline"):
        load_editor("flux", str(tmp_path / "missing"), device="cpu")


def test_no_regions_equals_stock_pipeline(editor):
    image = make_image()
    result = editor.edit(image, RegionPlan("make it red"), steps=2, seed=3, **FAST)
    w, h = result.generation_size
    stock = editor.pipe(
        image=editor.pipe.image_processor.resize(image, h, w), prompt="make it red", height=h, width=w, max_area=w * h,
        _auto_resize=False, num_inference_steps=2, guidance_scale=2.5, max_sequence_length=16,
        generator=torch.Generator().manual_seed(3),
    ).images[0].resize(image.size, Image.LANCZOS)
    assert result.attention is None
    assert np.array_equal(np.asarray(result.image), np.asarray(stock))


@pytest.mark.slow
def test_no_regions_equals_stock_pipeline_at_official_resolution(tiny_kontext_dir):
    ed = load_editor("flux", str(tiny_kontext_dir), device="cpu")
    ed.pipe.set_progress_bar_config(disable=True)
    image = make_image((800, 600))
    result = ed.edit(image, RegionPlan("make it red"), steps=1, seed=0, max_sequence_length=8)
    assert result.generation_size == (1184, 880)
    stock = ed.pipe(image=image, prompt="make it red", height=880, width=1184, max_area=1184 * 880,
                    num_inference_steps=1, guidance_scale=2.5, max_sequence_length=8,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(stock.resize((800, 600), Image.LANCZOS)))


def test_edit_with_regions_output_and_trace(editor):
    image = make_image()
    result = editor.edit(image, TWO_REGIONS, steps=3, switch=0.0, **FAST)
    assert result.image.size == image.size and result.image.mode == "RGB"
    assert result.generation_size == kontext_resolution(image.size, 128 * 128)
    layout = result.layout
    assert layout.text_len == 16 * 3 and layout.num_regions == 2
    assert result.attention.steps == {0: "default", 1: "default", 2: "default"}
    assert dict(result.attention.builds) == {"default": 1}  # one mask per rule set, not per block or step
    assert result.boxes == [(1, 2, 79, 67), (98, 59, 200, 150)]  # expanded 0.15 (ratio), int-truncated, clamped
    assert (result.attention.masked_passes, result.attention.unmasked_passes) == (3, 0)
    # region processors stay installed (once per editor), wrapping the stock ones; no edit is active afterwards
    processors = editor.pipe.transformer.attn_processors.values()
    assert {type(p).__name__ for p in processors} == {"RegionAttnProcessor"}
    assert {type(p.base).__name__ for p in processors} == {"FluxAttnProcessor"}
    assert editor.processors.active is None


def test_regions_change_the_result(editor):
    image = make_image()
    plain = editor.edit(image, RegionPlan(TWO_REGIONS.global_prompt), steps=2, **FAST).image
    regional = editor.edit(image, TWO_REGIONS, steps=2, **FAST).image
    assert not np.array_equal(np.asarray(plain), np.asarray(regional))


@pytest.mark.parametrize("switch, steps, expected_isolated", [(0.5, 4, 2), (0.05, 28, 1), (3, 6, 3), (0.0, 3, 0)])
def test_rule_switch_happens_at_the_right_step(editor, switch, steps, expected_isolated):
    seen = []

    def spy(pipe, step, t, kwargs):
        seen.append(step)
        return kwargs

    result = editor.edit(make_image(), TWO_REGIONS, steps=steps, switch=switch, callback=spy, **FAST)
    labels = [result.attention.steps[i] for i in range(steps)]
    assert labels == ["noise-isolation"] * expected_isolated + ["default"] * (steps - expected_isolated)
    assert sum(result.attention.builds.values()) == (2 if 0 < expected_isolated < steps else 1)
    assert seen == list(range(steps))  # the user's callback still runs every step


def test_cli_default_switch_isolates_step_zero_only(editor):
    result = editor.edit(make_image(), TWO_REGIONS, steps=28, **FAST)  # entry="cli": switch 0.05
    assert result.attention.steps[0] == "noise-isolation" and result.attention.steps[1] == "default"


def noise_prediction(editor, plan, image, **kwargs):
    """Capture the transformer's noise prediction of the first (only) step."""
    captured = []
    hook = editor.pipe.transformer.register_forward_hook(lambda m, a, out: captured.append(out[0].detach().clone()))
    try:
        result = editor.edit(image, plan, steps=1, seed=0, switch=0.0, **FAST, **kwargs)
    finally:
        hook.remove()
    P = result.layout.noise_grid.size
    return captured[0][0, :P], result


@pytest.mark.parametrize("changed", [1, 2])
def test_locality_hint_changes_only_its_box(one_block_editor, changed):
    image = make_image()
    base, result = noise_prediction(one_block_editor, TWO_REGIONS, image)
    regions = list(TWO_REGIONS.regions)
    regions[changed - 1] = Region(regions[changed - 1].bbox, "a blue bird" if changed == 1 else "a green frog")
    other, _ = noise_prediction(one_block_editor, RegionPlan(TWO_REGIONS.global_prompt, tuple(regions)), image)
    layout = result.layout
    T, P = layout.text_len, layout.noise_grid.size
    inside = layout.region_token_mask(changed, ("noise",))[T : T + P]
    diff = (base - other).abs().amax(dim=-1)
    assert inside.any() and (~inside).any()
    assert torch.equal(base[~inside], other[~inside]), "background or the other box changed"
    assert (diff[inside] > 1e-6).all(), "every patch of the box sees its hint"


def test_locality_with_overlapping_boxes(one_block_editor):
    image = make_image()
    plan = RegionPlan("x", (Region((10, 10, 120, 100), "a cat"), Region((80, 60, 190, 140), "a dog")))
    base, result = noise_prediction(one_block_editor, plan, image)
    changed = RegionPlan("x", (Region((10, 10, 120, 100), "a cow"), plan.regions[1]))
    other, _ = noise_prediction(one_block_editor, changed, image)
    layout = result.layout
    T, P = layout.text_len, layout.noise_grid.size
    box1 = layout.region_token_mask(1, ("noise",))[T : T + P]
    assert torch.equal(base[~box1], other[~box1])
    assert ((base - other).abs().amax(-1)[box1] > 1e-6).all()  # the overlap sees hint 1 too (union)


def test_flex_backend_matches_dense(editor):
    image = make_image()
    dense = editor.edit(image, TWO_REGIONS, steps=2, attention="dense", **FAST).image
    flex = editor.edit(image, TWO_REGIONS, steps=2, attention="flex", **FAST).image
    assert np.abs(np.asarray(dense, dtype=int) - np.asarray(flex, dtype=int)).max() <= 1


def test_trim_hint_padding_shortens_hint_spans(editor):
    result = editor.edit(make_image(), TWO_REGIONS, steps=1, trim_hint_padding=True, **FAST)
    main, *hints = [result.layout.main] + list(result.layout.hints)
    assert main == (0, 16)
    lens = [b - a for a, b in hints]
    assert lens == [len(editor.pipe.tokenizer_2(h).input_ids) for h in TWO_REGIONS.hints]
    assert all(n < 16 for n in lens)


def test_delete_main_prompt_drops_main_tokens(editor):
    result = editor.edit(make_image(), TWO_REGIONS, steps=1, delete_main_prompt=True, **FAST)
    assert result.layout.main is None and result.layout.text_len == 32
    assert "Main Prompt" not in result.layout.group_names()


def test_true_cfg_negative_pass_runs_unmasked(editor):
    result = editor.edit(make_image(), TWO_REGIONS, steps=2, true_cfg=2.0, negative_prompt="blurry", **FAST)
    assert result.attention.unmasked_passes == 2  # the negative pass of each of the 2 steps
    assert result.attention.steps == {0: "default", 1: "default"}


def test_custom_rules(editor):
    rules = {"Main, Main": True, "H1, H1": True, "H2, H2": True, "BBox 1, BBox 1": True, "BBox 2, BBox 2": True,
             "BG, BG": True, "BBox 1, H1": True, "BBox 2, H2": True}
    result = editor.edit(make_image(), TWO_REGIONS, steps=2, rules=rules, **FAST)
    assert result.attention.steps == {0: "custom", 1: "custom"}
    bad = {"Main, Main": True}
    with pytest.raises(ValueError, match="attend to nothing"):
        editor.edit(make_image(), TWO_REGIONS, steps=1, rules=bad, **FAST)


def test_layout_mismatch_raises_instead_of_silently_unmasking(editor):
    wrong = TokenLayout.build(5, [3], (2, 2), [(2, 2)]).with_box_regions([(0, 0, 16, 16)], (32, 32))
    region = RegionAttention(wrong, default_schedule(1, 1))
    plan = RegionPlan("x")
    with editor.processors.activate(region), pytest.raises(RuntimeError, match="layout does not match"):
        editor.pipe(image=make_image((64, 64)), prompt=plan.prompt_text, height=64, width=64, max_area=64 * 64,
                    _auto_resize=False, num_inference_steps=1, max_sequence_length=8)


@pytest.mark.parametrize(
    "plan, image, match",
    [
        (RegionPlan("x", (Region((10, 10, 50, 50), "a"),), image_size=(300, 300)), make_image(), "made for a 300x300"),
        (RegionPlan("x", (Region((150, 100, 260, 140), "a"),)), make_image(), "outside the 200x150 image"),
        (RegionPlan("x"), make_image((40, 200)), "at least 64"),
    ],
)
def test_bad_input_is_a_clear_value_error(editor, plan, image, match):
    with pytest.raises(ValueError, match=match):
        editor.edit(image, plan, steps=1, **FAST)


def test_bad_options(editor):
    with pytest.raises(ValueError, match="attention backend"):
        editor.edit(make_image(), TWO_REGIONS, steps=1, attention="sparse", **FAST)
    with pytest.raises(ValueError, match="max_sequence_length"):
        editor.edit(make_image(), TWO_REGIONS, steps=1, max_sequence_length=600)
    with pytest.raises(ValueError, match="needs at least one region"):
        editor.edit(make_image(), RegionPlan("x"), steps=1, delete_main_prompt=True, **FAST)


def test_non_rgb_images_are_converted(editor):
    rgba = make_image().convert("RGBA")
    out = editor.edit(rgba, TWO_REGIONS, steps=1, **FAST)
    assert out.image.mode == "RGB" and out.image.size == rgba.size


def test_seeded_runs_are_deterministic(editor):
    a = editor.edit(make_image(), TWO_REGIONS, steps=2, seed=5, **FAST).image
    b = editor.edit(make_image(), TWO_REGIONS, steps=2, seed=5, **FAST).image
    c = editor.edit(make_image(), TWO_REGIONS, steps=2, seed=6, **FAST).image
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_hints_batched_through_t5_equal_one_pass_per_hint(editor):
    """20 hints (two T5 batches): the official per-hint states, up to float rounding."""
    plan = RegionPlan("x", tuple(Region((10 + i, 10, 40 + i, 40), f"hint number {i}") for i in range(20)))
    image = make_image()
    encoded = editor.encode(plan, image, editor.generation_size(image.size),
                            {"delete_main_prompt": False, "max_sequence_length": 16})
    with torch.no_grad():
        one_by_one = [editor.pipe._get_t5_prompt_embeds(prompt=h, max_sequence_length=16) for h in plan.hints]
    assert encoded.hint_lens == [16] * 20
    torch.testing.assert_close(encoded.pipeline_kwargs["prompt_embeds"][:, 16:], torch.cat(one_by_one, dim=1),
                               rtol=1e-5, atol=1e-6)
