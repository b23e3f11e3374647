"""The mask planner: a region generator's mask becomes a mask-shaped region that the editors execute."""

import numpy as np
import pytest
import torch
from PIL import Image

from replan.backbones import load_editor
from replan.coords import mask_to_patch_mask
from replan.regions.model import RegionGenerator
from replan.regions.planner import MaskPlanner
from replan.testing.regions import save_tiny_regions_backbones
from tests.test_regions_model import TINY


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    backbones = save_tiny_regions_backbones(tmp_path_factory.mktemp("regions_planner"))
    return RegionGenerator.from_pretrained(str(backbones / "clip"), str(backbones / "t5"), **TINY)


def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))


def test_predicted_mask_becomes_a_mask_region_and_reaches_the_attention_core(generator, tiny_kontext_dir):
    last = generator.head.mlp[-1]
    with torch.no_grad():  # a head that marks every patch whose first refined feature is positive: a real shape
        last.weight.zero_()
        last.weight[0, 0] = 50.0
        last.bias.zero_()
    expected = generator.predict([image()], ["make the left half blue"], size=(200, 150))[0].numpy()
    assert expected.any() and not expected.all(), "the test needs a mask that is neither empty nor full"
    plan = MaskPlanner(generator).plan(image(), "make the left half blue")
    (region,) = plan.regions
    assert np.array_equal(region.mask, expected) and region.hint == "make the left half blue"
    editor = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs={"max_area": 128 * 128})
    editor.pipe.set_progress_bar_config(disable=True)
    result = editor.edit(image(), plan, steps=1, max_sequence_length=16)
    layout = result.layout
    grid = (layout.noise_grid.height, layout.noise_grid.width)
    T, P = layout.text_len, layout.noise_grid.size
    assert torch.equal(layout.region_token_mask(1, ("noise",))[T:T + P], mask_to_patch_mask(expected, (200, 150),
                                                                                                grid).flatten())


def test_empty_prediction_is_a_global_edit_or_an_error_in_strict_mode(generator, monkeypatch):
    monkeypatch.setattr(generator, "predict", lambda images, texts, size=None: torch.zeros(1, size[1], size[0],
                                                                                           dtype=torch.bool))
    plan = MaskPlanner(generator).plan(image(), "do nothing")
    assert plan.regions == () and plan.global_prompt == "do nothing" and "empty mask" in plan.repairs[0]
    with pytest.raises(ValueError, match="nothing to edit"):
        MaskPlanner(generator).plan(image(), "do nothing", strict=True)
    with pytest.raises(ValueError, match="instruction is empty"):
        MaskPlanner(generator).plan(image(), " ")
