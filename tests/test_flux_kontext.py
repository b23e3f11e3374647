"""The FLUX.1 Kontext region editor on tiny random components loaded through from_pretrained."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from replan.attention import GroupMembership, RegionAttention, RuleSet, TokenLayout, default_schedule, dense_mask
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
    ).images[0]
    assert result.attention is None
    # resized back to the input size with BICUBIC, as official (``image.resize((W, H))``), not Lanczos
    assert np.array_equal(np.asarray(result.image), np.asarray(stock.resize(image.size, Image.BICUBIC)))
    assert not np.array_equal(np.asarray(result.image), np.asarray(stock.resize(image.size, Image.LANCZOS)))


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
    assert np.array_equal(np.asarray(result.image), np.asarray(stock.resize((800, 600), Image.BICUBIC)))


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


def test_delete_main_prompt_without_regions_is_a_plain_global_edit(editor):
    # official: without regions the flag has no effect (the stock pipeline runs with the prompt)
    plain = editor.edit(make_image(), RegionPlan("x"), steps=1, **FAST).image
    deleted = editor.edit(make_image(), RegionPlan("x"), steps=1, delete_main_prompt=True, **FAST).image
    assert np.array_equal(np.asarray(plain), np.asarray(deleted))


def test_boxes_outside_the_image_are_expanded_then_clamped(editor):
    # partly outside: expanded from the raw box, then clamped (official); entirely outside: runs and covers nothing
    plan = RegionPlan("x", (Region((150, 100, 260, 140), "a"), Region((300, 10, 400, 50), "b")))
    result = editor.edit(make_image(), plan, steps=1, switch=0.0, **FAST)
    # box 1: dx = 110 * 0.15 = 16.5, dy = 6 → [133.5, 94, 276.5, 146] → [133, 94, 200, 146]
    assert result.boxes == [(133, 94, 200, 146), (285, 4, 200, 56)]
    noise = result.layout.noise_grid
    T, P = noise.start, noise.size
    assert result.layout.region_token_mask(1, ("noise",))[T : T + P].any()
    assert not result.layout.region_token_mask(2).any()  # no patch of either copy sees hint 2
    assert result.image.size == (200, 150)


# ---------------------------------------------------------------------------------------------- two-hop locality
def block_states(editor, plan, image, rules=None):
    """(joint hidden states after the double-stream block, noise prediction) of a one-step masked pass.

    The tiny Kontext has one double-stream and one single-stream block, so information crosses the mask twice."""
    tr = editor.pipe.transformer
    assert len(tr.transformer_blocks) == 1 and len(tr.single_transformer_blocks) == 1
    after_double, prediction = [], []
    hooks = [tr.transformer_blocks[0].register_forward_hook(
                 lambda m, a, out: after_double.append(torch.cat(out, dim=1).detach().clone())),
             tr.register_forward_hook(lambda m, a, out: prediction.append(out[0].detach().clone()))]
    try:
        result = editor.edit(image, plan, steps=1, seed=0, switch=None if rules else 0.0, rules=rules, **FAST)
    finally:
        for h in hooks:
            h.remove()
    P = result.layout.noise_grid.size
    return after_double[0][0], prediction[0][0, :P], result


def reach(mask: torch.Tensor, start: torch.Tensor, hops: int) -> torch.Tensor:
    """Tokens whose state may depend on the ``start`` tokens after ``hops`` masked attention layers."""
    changed = start.clone()
    for _ in range(hops):
        changed = changed | (mask & changed[None, :]).any(dim=1)
    return changed


# Default rules without "Background sees BBox i" and "BBox j sees BBox i": the hint's influence cannot leave its box
# even over two hops, unless a block ignores the mask.
CONFINED = RuleSet.from_pairs(
    [(g, g) for g in ("Main", "H1", "H2", "B1", "B2", "BG")]
    + [(h, k) for h in ("H1", "H2") for k in ("B1", "B2", "BG")]  # hints see the image (official, non-symmetric)
    + [("B1", "H1"), ("B2", "H2"), ("B1", "BG"), ("B2", "BG")]
    + [(q, "Main") for q in ("B1", "B2", "BG")] + [("Main", k) for k in ("B1", "B2", "BG")],
    "confined",
)


def test_locality_with_a_single_stream_block_default_rules(editor):
    """Default rules: after the double-stream block only hint 1 and box 1 (both copies) have changed — one hop,
    exactly. The single-stream block is a second hop: the background attends to box 1, so the prediction outside
    box 1 changes too; locality of the default rules is a one-layer property."""
    image = make_image()
    plan2 = RegionPlan(TWO_REGIONS.global_prompt, (Region(TWO_REGIONS.regions[0].bbox, "a blue bird"),
                                                    TWO_REGIONS.regions[1]))
    mid_a, out_a, result = block_states(editor, TWO_REGIONS, image)
    mid_b, out_b, _ = block_states(editor, plan2, image)
    layout = result.layout
    hint1 = torch.zeros(layout.total_len, dtype=torch.bool)
    hint1[slice(*layout.hints[0])] = True
    box1 = layout.region_token_mask(1)  # noise and reference copies
    one_hop = hint1 | box1
    assert torch.equal(mid_a[~one_hop], mid_b[~one_hop])
    T, P = layout.text_len, layout.noise_grid.size
    noise_box1 = box1[T : T + P]
    assert ((mid_a - mid_b).abs().amax(-1)[T : T + P][noise_box1] > 1e-6).all()
    mask = dense_mask(GroupMembership.from_layout(layout), result.schedule.at(0))[0, 0]
    assert torch.equal(reach(mask, hint1, 1), one_hop)
    assert reach(mask, hint1, 2)[T : T + P].all()  # two hops reach every noise patch ...
    assert ((out_a - out_b).abs().amax(-1)[~noise_box1] > 0).any()  # ... and the background's prediction moves


def test_locality_with_a_single_stream_block_is_exact_when_the_rules_confine_the_hint(editor):
    """With rules under which nothing outside box 1 reads box 1 or hint 1 (directly or through another token), the
    prediction outside box 1 is bit-identical after both blocks. An unmasked single-stream block would let the
    background read hint 1 (changed by the first block) and fail this."""
    image = make_image()
    plan2 = RegionPlan(TWO_REGIONS.global_prompt, (Region(TWO_REGIONS.regions[0].bbox, "a blue bird"),
                                                    TWO_REGIONS.regions[1]))
    _, out_a, result = block_states(editor, TWO_REGIONS, image, rules=CONFINED)
    _, out_b, _ = block_states(editor, plan2, image, rules=CONFINED)
    assert result.attention.steps == {0: "confined"}
    layout = result.layout
    T, P = layout.text_len, layout.noise_grid.size
    hint1 = torch.zeros(layout.total_len, dtype=torch.bool)
    hint1[slice(*layout.hints[0])] = True
    noise_box1 = layout.region_token_mask(1, ("noise",))[T : T + P]
    mask = dense_mask(GroupMembership.from_layout(layout), CONFINED)[0, 0]
    assert torch.equal(reach(mask, hint1, 2)[T : T + P], noise_box1)  # by hand: only box 1 is reachable
    assert noise_box1.any() and (~noise_box1).any()
    assert torch.equal(out_a[~noise_box1], out_b[~noise_box1])
    assert ((out_a - out_b).abs().amax(-1)[noise_box1] > 1e-6).all()


def test_a_second_editor_on_the_same_pipeline_does_not_wrap_twice(editor):
    from replan.backbones.flux_kontext import FluxKontextEditor

    before = editor.edit(make_image(), TWO_REGIONS, steps=1, **FAST).image
    second = FluxKontextEditor(editor.pipe, editor.spec, max_area=editor.max_area)
    processors = editor.pipe.transformer.attn_processors.values()
    assert {type(p.base).__name__ for p in processors} == {"FluxAttnProcessor"}  # stock processors underneath
    assert second.processors is editor.processors and len(editor.pipe.transformer._forward_pre_hooks) == 1
    after = second.edit(make_image(), TWO_REGIONS, steps=1, **FAST).image
    again = editor.edit(make_image(), TWO_REGIONS, steps=1, **FAST).image  # the first editor still works
    assert np.array_equal(np.asarray(before), np.asarray(after))
    assert np.array_equal(np.asarray(before), np.asarray(again))


class MaskSpy:
    """Weak references to every mask the attention processors are handed (a forward pre-hook on one attention)."""

    def __init__(self, attn):
        import weakref

        self.refs = []
        self.handle = attn.register_forward_pre_hook(
            lambda module, args, kwargs: self.refs.append(weakref.ref(kwargs["region"].mask)) if kwargs.get(
                "region") is not None else None, with_kwargs=True)

    def alive(self) -> int:
        import gc

        gc.collect()
        return sum(ref() is not None for ref in self.refs)


def test_the_mask_does_not_outlive_the_edit_finished_or_raised(editor):
    """An edit's L² mask is freed when the edit ends (its trace stays on the result), also when the edit raises."""
    spy = MaskSpy(editor.pipe.transformer.transformer_blocks[0].attn)
    try:
        result = editor.edit(make_image(), TWO_REGIONS, steps=2, switch=0.5, **FAST)
        assert spy.refs and spy.alive() == 0
        assert dict(result.attention.builds) == {"noise-isolation": 1, "default": 1}  # the trace is kept
        assert result.attention.steps == {0: "noise-isolation", 1: "default"}

        def fail(pipe, step, timestep, kwargs):
            raise RuntimeError("stopped by the test")

        spy.refs.clear()
        with pytest.raises(RuntimeError, match="stopped by the test"):
            editor.edit(make_image(), TWO_REGIONS, steps=2, callback=fail, **FAST)
        assert spy.refs and spy.alive() == 0 and editor.processors.active is None
    finally:
        spy.handle.remove()
    again = editor.edit(make_image(), TWO_REGIONS, steps=2, switch=0.5, **FAST)  # the editor still works
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))
