"""The offline smoke backbones edit at about 256x256 pixels of area; the Qwen editor's ``max_area`` gives exactly what
the stock pipeline gives at that size, and leaves the pipeline modules as it found them."""

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module
import numpy as np
import pytest
from PIL import Image

from replan.backbones import load_editor, resolve
from replan.backbones.qwen_image_edit import PIPELINE_AREA, QwenImageEditor
from replan.plan import Region, RegionPlan
from replan.testing.qwen_image import save_tiny_qwen_edit, small_qwen_sizes

PLAN = RegionPlan("make it warm", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))
AREA = 128 * 128


def image(size=(200, 150)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def module_sizes():
    return (edit_module.calculate_dimensions, plus_module.calculate_dimensions, plus_module.VAE_IMAGE_SIZE,
            plus_module.CONDITION_IMAGE_SIZE)


@pytest.mark.parametrize("name", ["tiny", "tiny_klein", "tiny_qwen"])
def test_tiny_backbones_generate_at_about_256_squared(name):
    editor = load_editor(name, device="cpu")
    # Kontext and klein stay under the area; Qwen's own size function rounds each side to 32 px (as at 1 MP)
    limit = 256 * 256 if name != "tiny_qwen" else 1.1 * 256 * 256
    for size in [(640, 480), (1600, 900), (300, 1200)]:
        w, h = editor.generation_size(size)
        assert w * h <= limit and w % 16 == 0 and h % 16 == 0, (size, w, h)


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_area")
    return {"edit": save_tiny_qwen_edit(root / "edit", num_layers=1),
            "plus": save_tiny_qwen_edit(root / "plus", plus=True, num_layers=1)}


def run(path, spec_name, monkeypatch=None, **editor_kwargs):
    editor = QwenImageEditor.from_pretrained(str(path), spec=resolve(spec_name), device="cpu",
                                             editor_kwargs=editor_kwargs)
    editor.pipe.set_progress_bar_config(disable=True)
    return editor.edit(image(), PLAN, steps=2, seed=1)


@pytest.mark.parametrize("kind, spec_name", [("edit", "qwenimageedit"), ("plus", "qwenimageedit2509")])
def test_qwen_max_area_equals_the_stock_pipeline_at_that_size(qwen_dirs, monkeypatch, kind, spec_name):
    before = module_sizes()
    scaled = run(qwen_dirs[kind], spec_name, max_area=AREA)
    assert module_sizes() == before  # restored after the call
    w, h = scaled.generation_size
    assert abs(w * h - AREA) <= 0.2 * AREA and scaled.image.size == (200, 150)
    # the same pipeline with its module sizes set to that area by hand (as the tests of the editor do)
    condition = round(plus_module.CONDITION_IMAGE_SIZE * AREA / PIPELINE_AREA)
    small_qwen_sizes(monkeypatch, area=AREA, condition_area=condition)
    reference = run(qwen_dirs[kind], spec_name)
    assert reference.generation_size == scaled.generation_size
    assert np.array_equal(np.asarray(reference.image), np.asarray(scaled.image))


def test_qwen_max_area_is_checked():
    with pytest.raises(ValueError, match="max_area must be in"):
        load_editor("tiny_qwen", device="cpu", editor_kwargs={"max_area": 10})
