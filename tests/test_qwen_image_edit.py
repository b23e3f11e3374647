"""Qwen-Image-Edit and EditPlus (2509/2511/FireRed) region editors on tiny random components."""

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image

from replan.attention import GroupMembership, RegionAttention, RuleSchedule, RuleSet, TokenLayout, dense_mask
from replan.backbones import load_editor, resolve
from replan.backbones.qwen_image_edit import QwenImageEditor, RegionQwenAttnProcessor
from replan.plan import Region, RegionPlan
from replan.testing.qwen_image import save_tiny_qwen_edit, small_qwen_sizes

PLAN = RegionPlan("make it warm", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))
KINDS = {"edit": ("qwen", {}), "plus": ("qwen_plus", {"plus": True}),
         "2511": ("qwen2511", {"plus": True, "zero_cond_t": True})}


@pytest.fixture(autouse=True)
def small_sizes(monkeypatch):
    small_qwen_sizes(monkeypatch)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen")
    dirs = {k: save_tiny_qwen_edit(root / k, **kw) for k, (_, kw) in KINDS.items()}
    dirs["edit-1"] = save_tiny_qwen_edit(root / "edit-1", num_layers=1)
    dirs["plus-1"] = save_tiny_qwen_edit(root / "plus-1", plus=True, num_layers=1)
    return dirs


def editor_for(tiny_dirs, kind):
    name = KINDS[kind.split("-")[0]][0]
    ed = load_editor(name, str(tiny_dirs[kind]), device="cpu")
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


def make_image(size=(200, 150), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_registry_defaults_and_aliases():
    assert resolve("qwen").name == "qwenimageedit" and resolve("qwen_plus").name == "qwenimageedit2509"
    assert resolve("qwen2511").model_id == "Qwen/Qwen-Image-Edit-2511"
    assert resolve("firerededit").pipeline_class == "QwenImageEditPlusPipeline"
    assert (resolve("qwen").steps, resolve("qwen_plus").steps) == (50, 40)
    spec = resolve("qwenimageedit")
    assert (spec.true_cfg, spec.negative_prompt, spec.has_image_prompt) == (4.0, " ", True)
    assert (spec.defaults("cli").switch, spec.defaults("cli").expand) == (0.5, 0.0)
    assert (spec.defaults("app").switch, spec.defaults("app").expand) == (0.5, 0.05)
    assert (spec.defaults("eval").switch, spec.defaults("eval").expand) == (0.0, 0.15)


@pytest.mark.parametrize("kind, cls", [("edit", QwenImageEditPipeline), ("plus", QwenImageEditPlusPipeline),
                                       ("2511", QwenImageEditPlusPipeline)])
def test_loads_through_from_pretrained(tiny_dirs, kind, cls):
    ed = editor_for(tiny_dirs, kind)
    assert isinstance(ed, QwenImageEditor) and isinstance(ed.pipe, cls)
    assert ed.pipe.transformer.config.zero_cond_t == (kind == "2511")
    # the dropped system prefix is measured with the loaded tokenizer (byte-level here), never the hard-coded 64
    assert ed.pipe.prompt_template_encode_start_idx == len(ed.prefix_ids) != 64


@pytest.mark.parametrize("kind", ["edit", "plus", "2511"])
def test_no_regions_equals_stock_pipeline(tiny_dirs, kind):
    ed = editor_for(tiny_dirs, kind)
    image = make_image()
    result = ed.edit(image, RegionPlan("make it warm"), steps=2, seed=1)
    w, h = result.generation_size
    stock = ed.pipe(image=image, prompt="make it warm", negative_prompt=" ", true_cfg_scale=4.0, height=h, width=w,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(stock.resize(image.size, Image.BICUBIC)))


@pytest.mark.parametrize("kind, resample", [("edit", Image.BICUBIC), ("plus", Image.LANCZOS)])
def test_input_resize(tiny_dirs, kind, resample, monkeypatch):
    """Qwen-Image-Edit: the VAE and the text encoder get the input PIL-resized with BICUBIC, as the official pipeline
    (``image.resize((w, h))``); EditPlus keeps its pipeline's own (Lanczos) resizing."""
    ed = editor_for(tiny_dirs, kind)
    image = make_image()
    seen = []
    encode = ed.pipe.vae.encode
    monkeypatch.setattr(ed.pipe.vae, "encode", lambda x, *a, **k: seen.append(x.detach().clone()) or encode(x, *a, **k))
    result = ed.edit(image, PLAN, steps=2, seed=1)
    w, h = result.generation_size
    expected = image.resize((w, h), resample)
    if kind == "edit":
        assert np.array_equal(np.asarray(ed.prompt_image(image)), np.asarray(expected))
    pixels = ed.pipe.image_processor.preprocess(expected, h, w)
    assert torch.equal(seen[0][:, :, 0], pixels.to(seen[0].dtype))
    other = Image.LANCZOS if resample == Image.BICUBIC else Image.BICUBIC
    assert not torch.equal(seen[0][:, :, 0], ed.pipe.image_processor.preprocess(image.resize((w, h), other), h, w))


def test_delete_main_prompt_as_official(tiny_dirs):
    """The text is the hint spans alone: the main prompt and its image-prompt tokens are dropped; background patches
    then read no text at all, box i reads hint i only."""
    ed = editor_for(tiny_dirs, "edit")
    image = make_image()
    full = ed.edit(image, PLAN, steps=2, seed=1, switch=0.0)
    result = ed.edit(image, PLAN, steps=2, seed=1, switch=0.0, delete_main_prompt=True)
    layout = result.layout
    assert layout.main is None and layout.image_prompt is None
    names = layout.group_names()
    assert "Main Prompt" not in names and "Image Prompt" not in names
    assert [b - a for a, b in layout.hints] == [b - a for a, b in full.layout.hints]
    assert layout.hints[0][0] == 0 and layout.text_len == sum(b - a for a, b in layout.hints)
    mask = dense_mask(GroupMembership.from_layout(layout), result.schedule.at(0))[0, 0]
    T, P = layout.text_len, layout.noise_grid.size
    box1, box2 = (layout.region_token_mask(i, ("noise",))[T : T + P] for i in (1, 2))
    noise_to_text = mask[T : T + P, :T]
    assert not noise_to_text[~(box1 | box2)].any()
    h1, h2 = (slice(*span) for span in layout.hints)
    assert noise_to_text[box1][:, h1].all() and not noise_to_text[box1 & ~box2][:, h2].any()
    assert result.image.size == image.size
    assert not np.array_equal(np.asarray(result.image), np.asarray(full.image))


def processor_ids(ed, text, prompt_image):
    """The ids the processor gives ``text`` with the image: what official encodes for every prompt."""
    user = ed._user_text(text)
    return ed.pipe.processor(text=[ed.pipe.prompt_template_encode.format(user)], images=prompt_image,
                             padding=True, return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("kind", ["edit", "plus"])
def test_image_prompt_span_and_hint_spans(tiny_dirs, kind):
    ed = editor_for(tiny_dirs, kind)
    image = make_image()
    result = ed.edit(image, PLAN, steps=2)
    tokens = ed.text_tokens(PLAN, image, result.generation_size, {"delete_main_prompt": False})
    prefix = len(ed.prefix_ids)
    ids = tokens.prepared["ids"][prefix:]
    start, end = result.layout.image_prompt
    assert ids[start] == ed.vision_start and ids[end - 1] == ed.vision_end
    pad = ed.pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert set(ids[start + 1 : end - 1]) == {pad}
    assert (start == 0) == (kind == "edit")  # EditPlus writes "Picture 1: " before the image
    assert result.layout.main == (0, len(ids))
    head = tokens.prepared["head"]
    for (a, b), hint, own in zip(result.layout.hints, PLAN.hints, tokens.prepared["hints"]):
        # one tokenisation: a hint's ids spliced after the vision span are exactly the processor's
        assert head + own == processor_ids(ed, hint, ed.prompt_image(image))
        assert b - a == len(own)
        assert ed.vision_start not in own and ed.vision_end not in own and pad not in own
        assert ed.pipe.tokenizer.decode(own).startswith(hint)
    names, member = result.layout.membership()
    assert member[start:end, names.index("Image Prompt")].all()
    assert not member[start:end, names.index("Main Prompt")].any()


@pytest.mark.parametrize("kind", ["edit", "plus"])
def test_encoding_once_equals_one_pass_per_prompt(tiny_dirs, kind):
    """One processor pass, the vision tower once, hints batched: the official per-prompt states, up to float noise."""
    ed = editor_for(tiny_dirs, kind)
    image = make_image()
    calls = {"processor": 0, "vision": 0, "language": 0}
    processor, visual = ed.pipe.processor, ed.pipe.text_encoder.model.visual

    class Counting:
        def __call__(self, *a, **kw):
            calls["processor"] += 1
            return processor(*a, **kw)

        def __getattr__(self, name):
            return getattr(processor, name)

    hooks = [visual.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
             ed.pipe.text_encoder.model.language_model.register_forward_hook(
                 lambda *a: calls.__setitem__("language", calls["language"] + 1))]
    ed.pipe.processor = Counting()
    try:
        gen = ed.generation_size(image.size)
        encoded = ed.encode(PLAN, image, gen, {"delete_main_prompt": False})
    finally:
        ed.pipe.processor = processor
        for h in hooks:
            h.remove()
    assert calls == {"processor": 1, "vision": 1, "language": 1}  # main, negative and both hints in one batch
    prompt_image = ed.prompt_image(image)
    cut = len(ed.prefix_ids)
    with torch.no_grad():
        main, _ = ed.pipe._get_qwen_prompt_embeds(prompt=PLAN.prompt_text, image=prompt_image)
        negative, _ = ed.pipe._get_qwen_prompt_embeds(prompt=" ", image=prompt_image)
        separate = [main]
        for hint in PLAN.hints:
            states, _ = ed.pipe._get_qwen_prompt_embeds(prompt=hint, image=prompt_image)
            ids = processor_ids(ed, hint, prompt_image)[cut:]
            _, end = ed._vision_span(ids)
            separate.append(states[:, end:])
    torch.testing.assert_close(encoded.pipeline_kwargs["prompt_embeds"], torch.cat(separate, dim=1),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoded.pipeline_kwargs["negative_prompt_embeds"], negative, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["edit", "plus"])
def test_negative_pass_is_unmasked(tiny_dirs, kind):
    ed = editor_for(tiny_dirs, kind)
    result = ed.edit(make_image(), PLAN, steps=3)
    layers = len(ed.pipe.transformer.transformer_blocks)
    assert result.attention.unmasked_passes == 3 and layers == 2  # one uncond pass per step
    assert result.attention.steps == {0: "noise-isolation", 1: "default", 2: "default"}  # CLI switch 0.5 of 3 → 1


def test_region_processor_equals_stock_without_restrictions(tiny_dirs):
    """Our masked path repeats the stock math: with rules that allow everything it must give the stock output."""
    ed = editor_for(tiny_dirs, "edit")
    transformer = ed.pipe.transformer
    g = torch.Generator().manual_seed(0)
    txt, h, w = 7, 4, 6
    inputs = dict(hidden_states=torch.randn(1, 2 * h * w, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, txt, 16, generator=g), timestep=torch.tensor([0.5]),
                  img_shapes=[[(1, h, w), (1, h, w)]], return_dict=False)
    with torch.no_grad():
        stock = transformer(**inputs)[0]
        layout = TokenLayout.build(5, [2], (h, w), [(h, w)], image_prompt=(1, 3)).with_box_regions(
            [(0, 0, 32, 32)], (w * 16, h * 16))
        names = layout.group_names()
        everything = RuleSet.from_pairs([(q, k) for q in names for k in names], "all")
        region = RegionAttention(layout, RuleSchedule.constant(everything))
        with ed.processors.activate(region):
            masked = transformer(**inputs)[0]
    assert region.steps == {0: "all"}
    torch.testing.assert_close(masked, stock, rtol=1e-5, atol=1e-6)
    assert all(isinstance(p, RegionQwenAttnProcessor) for p in transformer.attn_processors.values())
    assert ed.processors.active is None


def noise_prediction(ed, plan, image):
    captured = []
    hook = ed.pipe.transformer.register_forward_hook(lambda m, a, out: captured.append(out[0].detach().clone()))
    try:
        result = ed.edit(image, plan, steps=2, switch=0.0, true_cfg=1.0)  # 1 step: NaN sigmas (shift_terminal)
    finally:
        hook.remove()
    return captured[0][0, : result.layout.noise_grid.size], result


@pytest.mark.parametrize("kind", ["edit-1", "plus-1"])
def test_locality_hint_changes_only_its_box(tiny_dirs, kind):
    ed = editor_for(tiny_dirs, kind)
    image = make_image()
    base, result = noise_prediction(ed, PLAN, image)
    layout = result.layout
    T, P = layout.text_len, layout.noise_grid.size
    box1 = layout.region_token_mask(1, ("noise",))[T : T + P]
    background = ~(box1 | layout.region_token_mask(2, ("noise",))[T : T + P])
    # same token length: everything outside box 1 is bit-identical
    same_len = RegionPlan(PLAN.global_prompt, (Region(PLAN.regions[0].bbox, "a tan dog"), PLAN.regions[1]))
    other, _ = noise_prediction(ed, same_len, image)
    assert box1.any() and background.any()
    assert torch.equal(base[~box1], other[~box1])
    assert ((base - other).abs().amax(-1)[box1] > 1e-6).all()
    # a longer hint 1 also shifts hint 2's text positions (Qwen's text RoPE continues across hints, as official),
    # so box 2 may change too — the background does not (up to float summation order over a longer sequence)
    longer = RegionPlan(PLAN.global_prompt, (Region(PLAN.regions[0].bbox, "a big blue bird"), PLAN.regions[1]))
    other, _ = noise_prediction(ed, longer, image)
    torch.testing.assert_close(base[background], other[background], rtol=0, atol=1e-5)
    assert ((base - other).abs().amax(-1)[box1] > 1e-3).all()


def test_bad_options(tiny_dirs):
    ed = editor_for(tiny_dirs, "edit")
    with pytest.raises(ValueError, match="true_cfg"):
        ed.edit(make_image(), PLAN, steps=1, guidance=3.0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        ed.edit(make_image(), PLAN, steps=1)
    long_plan = RegionPlan("x", tuple(Region((10, 10, 60, 60), "a very long hint " * 60) for _ in range(5)))
    with pytest.raises(ValueError, match="text tokens"):
        ed.edit(make_image(), long_plan, steps=1)


def test_flex_backend_matches_dense(tiny_dirs):
    ed = editor_for(tiny_dirs, "edit")
    dense = ed.edit(make_image(), PLAN, steps=2, attention="dense").image
    flex = ed.edit(make_image(), PLAN, steps=2, attention="flex").image
    assert np.abs(np.asarray(dense, dtype=int) - np.asarray(flex, dtype=int)).max() <= 1
