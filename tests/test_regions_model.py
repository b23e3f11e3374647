"""Learnable regions: region generator shapes/threshold/save-load, losses vs hand computations, descriptions."""

import json

import pytest
import torch

from replan.regions.descriptions import Describer, DescriptionConfig, offline_pair, parse_pair, sample_key
from replan.regions.model import RegionGenerator, RegionModelConfig
from replan.testing.regions import save_tiny_regions_backbones, shape_image

TINY = dict(image_size=32, heads=2, mlp_hidden=16, g_hidden=32)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return save_tiny_regions_backbones(tmp_path_factory.mktemp("regions_backbones"))


@pytest.fixture(scope="module")
def model(backbones):
    torch.manual_seed(0)
    return RegionGenerator.from_pretrained(str(backbones / "clip"), str(backbones / "t5"), **TINY)


def test_shapes(model):
    images = [shape_image("red", "square"), shape_image("blue", "circle", size=40)]
    out = model(model.preprocess(images), ["make the square blue", "remove the circle"], with_g=True, hidden_layer=-2)
    assert model.grid == 4
    assert out.probs.shape == (2, 16) and out.refined.shape == (2, 16, 32) and out.patches.shape == (2, 16, 32)
    assert out.mask.shape == (2, 4, 4) and set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert ((out.probs > 0.5).float().view(2, 4, 4) == out.mask).all()
    assert out.g_fused.shape == (2, 32) and torch.allclose(out.g_fused.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out.hidden.shape == (2, 17, 32) and out.image_embeds.shape == (2, 32)
    masks = model.predict(images, ["a", "b"], size=(50, 30))
    assert masks.shape == (2, 30, 50) and masks.dtype == torch.bool
    assert all(not p.requires_grad for p in model.clip_vision.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_threshold_and_upsample(model):
    probs = torch.tensor([[0.2, 0.5, 0.51, 0.9]])
    assert model.threshold(probs).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    old = model.cfg.theta
    try:
        model.cfg.theta = 0.0
        assert model.threshold(probs).sum() == 4
        model.cfg.theta = 0.95
        assert model.threshold(probs).sum() == 0
    finally:
        model.cfg.theta = old
    up = model.upsample(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), 4, 4)
    assert up.shape == (1, 1, 4, 4)
    assert up[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    # a head biased to "everything" gives a full mask, one biased to "nothing" an empty one
    x = model.preprocess([shape_image("red", "square")])
    bias = model.head.mlp[-1].bias
    saved = bias.data.clone()
    try:
        bias.data.fill_(50.0)
        assert model(x, ["x"]).mask.sum() == 16
        bias.data.fill_(-50.0)
        assert model(x, ["x"]).mask.sum() == 0
    finally:
        bias.data.copy_(saved)


def test_save_load_roundtrip_and_config_mismatch(model, backbones, tmp_path):
    x = model.preprocess([shape_image("green", "circle")])
    want = model(x, ["make it red"]).probs
    path = model.save(tmp_path / "ckpt")
    again = RegionGenerator.load(path)
    assert torch.allclose(again(x, ["make it red"]).probs, want, atol=1e-6)
    other = RegionModelConfig(**{**json.loads((path / "region_config.json").read_text()), "theta": 0.3})
    with pytest.raises(ValueError, match="different region-model config.*theta"):
        RegionGenerator.load(path, config=other)
    bigger = RegionGenerator.from_pretrained(str(backbones / "clip"), str(backbones / "t5"),
                                             **{**TINY, "mlp_hidden": 8})
    with pytest.raises(ValueError, match="does not fit"):
        bigger.load_head(path)
    with pytest.raises(ValueError, match="not a region-generator checkpoint"):
        RegionGenerator.load(tmp_path)


# ------------------------------------------------------------------------------------------------ descriptions
def test_descriptions_offline_parse_and_cache(tmp_path):
    assert offline_pair("a red square on a white background") == ("change the red to blue",
                                                                  "a blue square on a white background")
    ins, out = offline_pair("a photo of a lake")
    assert ins.startswith("add ") and out.startswith("a photo of a lake with ")
    assert parse_pair('Sure: {"instruction": "add a hat", "edited_caption": "a cat with a hat"}') == (
        "add a hat", "a cat with a hat")
    with pytest.raises(ValueError, match="no instruction"):
        parse_pair("no json here")
    calls = []

    def llm(prompt):
        calls.append(prompt)
        return '{"instruction": "make the sky pink", "edited_caption": "a lake under a pink sky"}'

    img = shape_image("red", "square")
    cache = tmp_path / "desc.jsonl"
    d = Describer(DescriptionConfig(cache=str(cache)), llm=llm)
    row = d.training_texts(img, "a lake")
    assert (row["t_o"], row["t_ins"], row["t_e"], row["generator"]) == (
        "a lake", "make the sky pink", "a lake under a pink sky", "custom")
    assert "Caption: a lake" in calls[0]
    d.training_texts(img, "a lake")
    assert len(calls) == 1
    again = Describer(DescriptionConfig(cache=str(cache)), llm=llm)  # read back from disk
    assert again.training_texts(img, "a lake") == row and len(calls) == 1
    assert sample_key(img, "a lake") != sample_key(img, "a lake.") == sample_key(img, "a lake.")
    assert again.target("a lake", "make the sky pink") == '{"instruction": "make the sky pink", ' \
                                                          '"edited_caption": "a lake under a pink sky"}'
    assert len(calls) == 2 and "Edit instruction: make the sky pink" in calls[1]


def test_descriptions_vlm_caption_and_transformers_llm(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from replan.testing.tokenizers import tiny_qwen2_tokenizer

    class FakeVLM:
        def generate(self, image, prompt):
            self.prompt = prompt
            return type("Reply", (), {"text": " a red square. "})()

    vlm = FakeVLM()
    d = Describer(DescriptionConfig(t_o_source="vlm"), vlm=vlm)
    row = d.training_texts(shape_image("red", "square"), "ignored caption")
    assert row["t_o"] == "a red square." and row["generator"] == "offline" and "one short sentence" in vlm.prompt
    tok = tiny_qwen2_tokenizer()
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    d = Describer(DescriptionConfig(llm="transformers", llm_model=str(tmp_path / "lm"), max_new_tokens=8))
    t_e = d.target("a red square", "make it blue")  # a random LM: any text, but through the real generate()
    assert isinstance(t_e, str) and d.cache
    with pytest.raises(ValueError, match="no instruction"):
        d.training_texts(shape_image("red", "square"), "a red square")
