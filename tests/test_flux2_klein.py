"""The FLUX.2 [klein] region editor (base and step-distilled) on tiny random components loaded via from_pretrained."""

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from replan.attention import RegionAttention, TokenLayout, default_schedule
from replan.backbones import load_editor, resolve
from replan.backbones.flux2_klein import Flux2KleinEditor, klein_reference_size
from replan.backbones.registry import editor_class
from replan.plan import Region, RegionPlan
from replan.testing.klein import TINY_KLEIN_EDITOR_KWARGS, TINY_KLEIN_OUT_LAYERS, save_tiny_klein

FAST = {"max_sequence_length": 16}
TWO_REGIONS = RegionPlan(
    "make it warmer", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog"))
)


def make_image(size=(200, 150), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _load(name, path, **editor_kwargs):
    ed = load_editor(name, str(path), device="cpu", editor_kwargs={**TINY_KLEIN_EDITOR_KWARGS, **editor_kwargs})
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_klein(tmp_path_factory.mktemp("tiny_klein_base"), distilled=False)


@pytest.fixture(scope="module")
def base(base_dir):
    return _load("flux_klein_base", base_dir)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return _load("klein", save_tiny_klein(tmp_path_factory.mktemp("tiny_klein"), distilled=True))


@pytest.fixture(scope="module")
def one_block(tmp_path_factory):
    """One double-stream block and no single-stream block: hint information cannot travel a second hop."""
    path = save_tiny_klein(tmp_path_factory.mktemp("tiny_klein_1"), distilled=True, num_layers=1, num_single_layers=0)
    return _load("klein", path)


class CallSpy:
    """Forward hook on the transformer: counts calls, keeps the outputs and the keyword inputs of each call."""

    def __init__(self, transformer):
        self.outputs, self.inputs = [], []
        self.handles = [
            transformer.register_forward_pre_hook(lambda m, a, kw: self.inputs.append(kw), with_kwargs=True),
            transformer.register_forward_hook(lambda m, a, out: self.outputs.append(out[0].detach().clone())),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ registry, loading
def test_aliases_resolve_to_the_klein_editor():
    assert resolve("klein") is resolve("flux_klein")
    for name in ("flux_klein", "flux_klein_4b", "flux_klein_base", "flux_klein_base_4b"):
        spec = resolve(name)
        assert editor_class(spec) is Flux2KleinEditor and spec.pipeline_class == "Flux2KleinPipeline"
    assert (resolve("klein").steps, resolve("klein").true_cfg) == (4, None)
    assert (resolve("flux_klein_base").steps, resolve("flux_klein_base").true_cfg) == (50, 4.0)


def test_loaded_through_from_pretrained(base, distilled):
    for ed, is_distilled in ((base, False), (distilled, True)):
        assert isinstance(ed, Flux2KleinEditor) and isinstance(ed.pipe, Flux2KleinPipeline)
        assert ed.distilled is is_distilled and ed.pipe.config.is_distilled is is_distilled
        assert ed.text_encoder_out_layers == TINY_KLEIN_OUT_LAYERS and ed.patch == 16


def test_bad_editor_options_fail_at_load(base_dir):
    with pytest.raises(ValueError, match=r"text_encoder_out_layers \(9, 18, 27\) do not fit"):
        load_editor("flux_klein_base", str(base_dir), device="cpu")  # the pipeline default needs >= 27 layers
    with pytest.raises(ValueError, match="transformer expects 48"):
        _load("flux_klein_base", base_dir, text_encoder_out_layers=(1, 2))
    with pytest.raises(ValueError, match="max_area"):
        _load("flux_klein_base", base_dir, max_area=2048 * 2048)


# ------------------------------------------------------------------------------------------------ sizes, stock parity
def test_reference_size_follows_the_pipeline():
    assert klein_reference_size((200, 150)) == (192, 144)  # native, floored to 16
    assert klein_reference_size((1024, 1024)) == (1024, 1024)
    assert klein_reference_size((2000, 1500)) == (1168, 880)  # int(2000 * s) = 1182, int(1500 * s) = 886
    assert klein_reference_size((200, 150), 128 * 128) == (144, 96)


@pytest.mark.parametrize("which", ["base", "distilled"])
def test_no_regions_equals_stock_pipeline(request, which):
    ed = request.getfixturevalue(which)
    image = make_image((144, 112))  # a multiple of 16 within max_area: the reference is the input itself
    result = ed.edit(image, RegionPlan("make it red"), steps=2, seed=3, **FAST)
    assert result.generation_size == (144, 112) and result.attention is None
    stock = ed.pipe(image=image, prompt="make it red", num_inference_steps=2, max_sequence_length=16,
                    text_encoder_out_layers=TINY_KLEIN_OUT_LAYERS, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(stock))


def test_no_regions_resized_reference_equals_stock(base):
    image = make_image()  # 200x150 > max_area: the whole input is resized to the generation size
    result = base.edit(image, RegionPlan("make it red"), steps=2, seed=1, guidance=2.0, **FAST)
    w, h = result.generation_size
    assert (w, h) == klein_reference_size(image.size, 128 * 128) == (144, 96)
    stock = base.pipe(image=base.pipe.image_processor.resize(image, h, w), prompt="make it red", height=h, width=w,
                      num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16,
                      text_encoder_out_layers=TINY_KLEIN_OUT_LAYERS, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(np.asarray(result.image), np.asarray(stock.images[0].resize(image.size, Image.BICUBIC)))


@pytest.mark.parametrize("size", [(200, 150), (90, 250), (128, 128), (144, 112)])
def test_layout_lengths_match_the_pipeline(distilled, size):
    with CallSpy(distilled.pipe.transformer) as spy:
        result = distilled.edit(make_image(size), RegionPlan("x", (Region((5, 5, 60, 60), "a cat"),)), steps=1,
                                **FAST)
    kw = spy.inputs[0]
    layout, (w, h) = result.layout, result.generation_size
    assert kw["hidden_states"].shape[1] == 2 * (w // 16) * (h // 16)  # noise + one reference of the same grid
    assert kw["encoder_hidden_states"].shape[1] + kw["hidden_states"].shape[1] == layout.total_len
    assert torch.equal(kw["txt_ids"][0, :, 3], torch.arange(layout.text_len))  # the pipeline's ids over the concat


@pytest.mark.slow
def test_default_max_area_matches_the_pipelines_own_sizing(tmp_path_factory):
    ed = _load("klein", save_tiny_klein(tmp_path_factory.mktemp("tiny_klein_mp"), distilled=True),
               max_area=1024 * 1024)
    image = make_image((1100, 1000))  # over 1 MP: the pipeline resizes it to 1 MP, then floors to 16
    stock = ed.pipe(image=image, prompt="x", num_inference_steps=1, max_sequence_length=8,
                    text_encoder_out_layers=TINY_KLEIN_OUT_LAYERS, output_type="pil").images[0]
    result = ed.edit(image, RegionPlan("x", (Region((100, 100, 600, 500), "a cat"),)), steps=1, max_sequence_length=8)
    assert result.generation_size == stock.size == (1072, 976) and result.image.size == image.size


def test_too_small_generation_size_is_a_clear_value_error(distilled):
    with pytest.raises(ValueError, match="at least 64 px .*raise max_area"):
        distilled.edit(make_image((300, 64)), RegionPlan("x"), steps=1, **FAST)


# ------------------------------------------------------------------------------------------------ locality
def noise_prediction(editor, plan, image, **kwargs):
    with CallSpy(editor.pipe.transformer) as spy:
        result = editor.edit(image, plan, steps=1, seed=0, switch=0.0, **FAST, **kwargs)
    assert len(spy.outputs) == 1
    return spy.outputs[0][0, : result.layout.noise_grid.size], result


@pytest.mark.parametrize("changed", [1, 2])
def test_locality_hint_changes_only_its_box(one_block, changed):
    image = make_image()
    base_pred, result = noise_prediction(one_block, TWO_REGIONS, image)
    regions = list(TWO_REGIONS.regions)
    regions[changed - 1] = Region(regions[changed - 1].bbox, "a blue bird" if changed == 1 else "a green frog")
    other, _ = noise_prediction(one_block, RegionPlan(TWO_REGIONS.global_prompt, tuple(regions)), image)
    layout = result.layout
    T, P = layout.text_len, layout.noise_grid.size
    inside = layout.region_token_mask(changed, ("noise",))[T : T + P]
    assert inside.any() and (~inside).any()
    assert torch.equal(base_pred[~inside], other[~inside]), "background or the other box changed"
    assert ((base_pred - other).abs().amax(dim=-1)[inside] > 1e-6).all(), "every patch of the box sees its hint"


# ------------------------------------------------------------------------------------------------ guidance
def test_base_cfg_negative_pass_runs_unmasked(base):
    with CallSpy(base.pipe.transformer) as spy:
        result = base.edit(make_image(), TWO_REGIONS, steps=2, **FAST)  # default guidance: the spec's 4.0
    assert len(spy.outputs) == 4  # cond + uncond per step
    assert [kw["encoder_hidden_states"].shape[1] for kw in spy.inputs] == [48, 16, 48, 16]
    assert result.attention.unmasked_passes == 2  # the negative pass of each step
    assert result.attention.steps == {0: "default", 1: "default"}
    assert base.allows_unmasked_passes({}) and not base.allows_unmasked_passes({"guidance": 1.0})


def test_base_without_cfg_is_one_masked_call_per_step(base):
    with CallSpy(base.pipe.transformer) as spy:
        result = base.edit(make_image(), TWO_REGIONS, steps=2, guidance=1.0, **FAST)
    assert len(spy.outputs) == 2 and result.attention.unmasked_passes == 0


def test_base_custom_negative_prompt(base):
    image = make_image()
    default = base.edit(image, TWO_REGIONS, steps=2, **FAST).image
    custom = base.edit(image, TWO_REGIONS, steps=2, negative_prompt="blurry", **FAST).image
    assert not np.array_equal(np.asarray(default), np.asarray(custom))
    with pytest.raises(ValueError, match="same CFG scale"):
        base.edit(image, TWO_REGIONS, steps=1, guidance=3.0, true_cfg=2.0, **FAST)


def test_distilled_is_one_call_per_step(distilled):
    with CallSpy(distilled.pipe.transformer) as spy:
        result = distilled.edit(make_image(), TWO_REGIONS, steps=3, **FAST)
    assert len(spy.outputs) == 3 and result.attention.unmasked_passes == 0
    assert not distilled.allows_unmasked_passes({})


@pytest.mark.parametrize("option", [{"guidance": 4.0}, {"true_cfg": 2.0}, {"negative_prompt": "blurry"}])
def test_distilled_rejects_cfg(distilled, option):
    with pytest.raises(ValueError, match="step-distilled and ignores CFG"):
        distilled.edit(make_image(), TWO_REGIONS, steps=1, **option, **FAST)
    distilled.edit(make_image(), TWO_REGIONS, steps=1, guidance=1.0, **FAST)  # 1.0 means "no CFG": accepted


# ------------------------------------------------------------------------------------------------ rules, text
@pytest.mark.parametrize("switch, steps, expected_isolated", [(0.5, 4, 2), (0.05, 28, 1), (3, 6, 3), (0.0, 3, 0)])
def test_rule_switch_happens_at_the_right_step(distilled, switch, steps, expected_isolated):
    seen = []

    def spy(pipe, step, t, kwargs):
        seen.append(step)
        return kwargs

    result = distilled.edit(make_image(), TWO_REGIONS, steps=steps, switch=switch, callback=spy, **FAST)
    labels = [result.attention.steps[i] for i in range(steps)]
    assert labels == ["noise-isolation"] * expected_isolated + ["default"] * (steps - expected_isolated)
    assert sum(result.attention.builds.values()) == (2 if 0 < expected_isolated < steps else 1)
    assert seen == list(range(steps))


def test_trim_hint_padding_keeps_the_real_tokens_only(distilled):
    image, options = make_image(), {"delete_main_prompt": False, "max_sequence_length": 128}
    gen = distilled.generation_size(image.size)
    padded = distilled.encode(TWO_REGIONS, image, gen, dict(options))
    trimmed = distilled.encode(TWO_REGIONS, image, gen, {**options, "trim_hint_padding": True})
    assert padded.hint_lens == [128, 128] and trimmed.main_len == 128
    tok = distilled.pipe.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": h}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False) for h in TWO_REGIONS.hints]
    assert trimmed.hint_lens == [len(tok(c).input_ids) for c in chats] and all(n < 128 for n in trimmed.hint_lens)
    n1, n2 = trimmed.hint_lens
    full, short = padded.pipeline_kwargs["prompt_embeds"], trimmed.pipeline_kwargs["prompt_embeds"]
    assert torch.equal(short[:, 128 : 128 + n1], full[:, 128 : 128 + n1])  # the same states, padding dropped
    assert torch.equal(short[:, 128 + n1 :], full[:, 256 : 256 + n2])
    result = distilled.edit(image, TWO_REGIONS, steps=1, trim_hint_padding=True, max_sequence_length=128)
    assert result.layout.text_len == 128 + n1 + n2


def test_delete_main_prompt(base, distilled):
    result = distilled.edit(make_image(), TWO_REGIONS, steps=1, delete_main_prompt=True, **FAST)
    assert result.layout.main is None and result.layout.text_len == 32
    result = base.edit(make_image(), TWO_REGIONS, steps=1, delete_main_prompt=True, **FAST)
    assert result.attention.unmasked_passes == 1  # 32 text tokens vs the negative's 16: still told apart
    # 16 hint tokens == 16 negative tokens: the passes are told apart by their order in the step, not their length
    one = RegionPlan("x", TWO_REGIONS.regions[:1])
    result = base.edit(make_image(), one, steps=2, delete_main_prompt=True, **FAST)
    assert result.layout.text_len == 16 and result.attention.unmasked_passes == 2
    assert result.attention.steps == {0: "default", 1: "default"}


# ------------------------------------------------------------------------------------------------ backends, errors
def test_flex_backend_matches_dense(distilled):
    image = make_image()
    dense = distilled.edit(image, TWO_REGIONS, steps=2, attention="dense", **FAST).image
    flex = distilled.edit(image, TWO_REGIONS, steps=2, attention="flex", **FAST).image
    assert np.abs(np.asarray(dense, dtype=int) - np.asarray(flex, dtype=int)).max() <= 1


def test_layout_mismatch_raises_instead_of_silently_unmasking(distilled):
    wrong = TokenLayout.build(5, [3], (2, 2), [(2, 2)]).with_box_regions([(0, 0, 16, 16)], (32, 32))
    region = RegionAttention(wrong, default_schedule(1, 1))
    with distilled.processors.activate(region), pytest.raises(RuntimeError, match="layout does not match"):
        distilled.pipe(image=make_image((64, 64)), prompt="x", num_inference_steps=1, max_sequence_length=8,
                       text_encoder_out_layers=TINY_KLEIN_OUT_LAYERS)
    assert distilled.processors.active is None
    assert {type(p.base).__name__ for p in distilled.pipe.transformer.attn_processors.values()} == {
        "Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"}


def test_hints_batched_through_the_text_encoder_equal_one_pass_per_hint(distilled):
    plan = RegionPlan("x", tuple(Region((10 + i, 10, 40 + i, 40), f"hint number {i}") for i in range(18)))
    image = make_image()
    encoded = distilled.encode(plan, image, distilled.generation_size(image.size),
                               {"delete_main_prompt": False, "max_sequence_length": 16})
    with torch.no_grad():
        one_by_one = [distilled._encode(h, 16) for h in plan.hints]
    torch.testing.assert_close(encoded.pipeline_kwargs["prompt_embeds"][:, 16:], torch.cat(one_by_one, dim=1),
                               rtol=1e-5, atol=1e-6)
