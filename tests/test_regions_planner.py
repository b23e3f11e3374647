"""The mask planner: a region generator's mask becomes a mask-shaped region that the editors execute."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from replan.backbones import load_editor
from replan.regions.model import RegionGenerator
from replan.regions.planner import MaskPlanner
from replan.testing.regions import save_tiny_regions_backbones
from tests.test_regions_model import TINY


@pytest.fixture(scope="module")
def backbones_dir(tmp_path_factory):
    return save_tiny_regions_backbones(tmp_path_factory.mktemp("regions_planner"))


@pytest.fixture(scope="module")
def generator(backbones_dir):
    return RegionGenerator.from_pretrained(str(backbones_dir / "clip"), str(backbones_dir / "t5"), **TINY)


def image(width=200, height=150):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


class FixedLogits(torch.nn.Module):
    """Stands in for the mask MLP: +50 on the patches of ``pattern`` (a (g, g) 0/1 grid), −50 elsewhere."""

    def __init__(self, pattern):
        super().__init__()
        self.register_buffer("logits", (torch.as_tensor(pattern, dtype=torch.float32).flatten() * 100 - 50))

    def forward(self, x):
        return self.logits.view(1, -1, 1).expand(x.shape[0], -1, 1)


PATTERN = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]])  # an L and a corner: not a box


def test_predicted_mask_becomes_a_mask_region_and_reaches_the_attention_core(generator, tiny_kontext_dir):
    gen = copy.deepcopy(generator)
    gen.head.mlp = FixedLogits(PATTERN)
    picture = image(128, 64)
    # expected by hand: the 4x4 grid on a 128x64 image is 32x16-pixel cells
    expected = np.kron(PATTERN, np.ones((16, 32), dtype=int)).astype(bool)
    plan = MaskPlanner(gen).plan(picture, "make the left half blue")
    (region,) = plan.regions
    assert region.mask.shape == (64, 128) and np.array_equal(region.mask, expected)
    assert region.hint == "make the left half blue"
    editor = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs={"max_area": 128 * 128})
    editor.pipe.set_progress_bar_config(disable=True)
    result = editor.edit(picture, plan, steps=1, max_sequence_length=16)
    layout = result.layout
    gh, gw = layout.noise_grid.height, layout.noise_grid.width
    T, P = layout.text_len, layout.noise_grid.size
    got = layout.region_token_mask(1, ("noise",))[T:T + P].view(gh, gw).numpy()
    assert np.array_equal(got, outward_tokens(expected, gh, gw)) and got.any() and not got.all()


def outward_tokens(mask, gh, gw):
    """By hand: the editor's token grid spans the whole image, so pixel [x, x+1) covers token columns
    floor(x·gw/W) … ceil((x+1)·gw/W) − 1 (rows alike); a token is in if any masked pixel covers it."""
    h, w = mask.shape
    want = np.zeros((gh, gw), dtype=bool)
    for y, x in zip(*np.nonzero(mask)):
        want[(y * gh) // h: -((-(y + 1) * gh) // h), (x * gw) // w: -((-(x + 1) * gw) // w)] = True
    return want


def test_empty_prediction_is_a_global_edit_or_an_error_in_strict_mode(generator, monkeypatch):
    monkeypatch.setattr(generator, "predict", lambda images, texts, size=None: torch.zeros(1, size[1], size[0],
                                                                                           dtype=torch.bool))
    plan = MaskPlanner(generator).plan(image(), "do nothing")
    assert plan.regions == () and plan.global_prompt == "do nothing" and "empty mask" in plan.repairs[0]
    with pytest.raises(ValueError, match="nothing to edit"):
        MaskPlanner(generator).plan(image(), "do nothing", strict=True)
    with pytest.raises(ValueError, match="instruction is empty"):
        MaskPlanner(generator).plan(image(), " ")


def test_predictions_are_deterministic_with_dropout(backbones_dir, tmp_path):
    """dropout > 0: the head is in eval mode after loading and inside predict (train() belongs to the trainer)."""
    gen = RegionGenerator.from_pretrained(str(backbones_dir / "clip"), str(backbones_dir / "t5"),
                                          **{**TINY, "dropout": 0.5})
    assert not gen.head.training
    gen.head.train()  # as the trainer leaves it: predict switches to eval and back
    x = [image(64, 64)]
    first = gen.predict(x, ["make it blue"])
    assert all(torch.equal(first, gen.predict(x, ["make it blue"])) for _ in range(3)) and gen.head.training
    out = gen(gen.preprocess(x), ["make it blue"])   # in training mode dropout acts (the same call differs)
    assert not torch.equal(out.probs, gen(gen.preprocess(x), ["make it blue"]).probs)
    loaded = RegionGenerator.load(gen.save(tmp_path / "ckpt"))
    assert not loaded.training and not loaded.head.training
    plans = [MaskPlanner(loaded).plan(image(64, 64), "make it blue") for _ in range(2)]
    assert plans[0] == plans[1]
