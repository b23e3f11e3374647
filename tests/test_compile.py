"""Compiled region attention on CPU (``compile_repeated_blocks``; inductor works on CPU): masks reach the compiled
blocks as data, so an edit compiles a fixed number of graphs and later edits of the same shape compile none.

Graphs are counted with dynamo's counters (``unique_graphs``: every compile, first or re-, adds one)."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from torch._dynamo.utils import counters

from replan.backbones import load_editor
from replan.plan import Region, RegionPlan

FAST = {"max_sequence_length": 16}
P1 = RegionPlan("make it warmer", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))
# other hints and other boxes, the same token count (hints are padded to 16 tokens)
P2 = RegionPlan("make it colder", (Region((20, 30, 90, 80), "a blue cow"), Region((100, 20, 180, 120), "a frog")))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def make_image(size=(200, 150)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def kontext(path, compile_kwargs=None):
    ed = load_editor("flux", str(path), device="cpu", editor_kwargs={"max_area": 128 * 128})
    ed.pipe.set_progress_bar_config(disable=True)
    if compile_kwargs is not None:
        ed.compile(**compile_kwargs)
    return ed


@pytest.mark.slow
def test_dense_compiles_once_per_shape_and_reuses_graphs_across_steps_rules_and_plans(tiny_kontext_dir):
    ed, eager = kontext(tiny_kontext_dir, {}), kontext(tiny_kontext_dir)
    image = make_image()
    start = graphs()
    first = ed.edit(image, P1, steps=12, switch=0.5, **FAST)  # 6 noise-isolation steps, then the defaults
    assert dict(first.attention.builds) == {"noise-isolation": 1, "default": 1}
    assert graphs() - start == 2  # one per block class (double- and single-stream), for both rule sets
    start = graphs()
    again = ed.edit(image, P1, steps=12, switch=0.5, **FAST)
    other = ed.edit(image, P2, steps=12, switch=0.5, **FAST)
    assert graphs() - start == 0  # zero recompiles: same shape, other rules / hints / boxes are data
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    reference = eager.edit(image, P1, steps=12, switch=0.5, **FAST)
    assert np.abs(np.asarray(first.image, dtype=int) - np.asarray(reference.image, dtype=int)).max() <= 2


@pytest.mark.slow
def test_no_regions_compiled_is_the_stock_pipeline_compiled_bit_for_bit(tiny_kontext_dir):
    image = make_image()
    ed = kontext(tiny_kontext_dir, {})
    result = ed.edit(image, RegionPlan("make it red"), steps=2, seed=3, **FAST)
    w, h = result.generation_size
    stock = FluxKontextPipeline.from_pretrained(tiny_kontext_dir)  # no replan processors, no hook
    stock.set_progress_bar_config(disable=True)
    stock.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    out = stock(image=stock.image_processor.resize(image, h, w), prompt="make it red", height=h, width=w,
                max_area=w * h, _auto_resize=False, num_inference_steps=2, guidance_scale=2.5, max_sequence_length=16,
                generator=torch.Generator().manual_seed(3)).images[0].resize(image.size, Image.BICUBIC)
    assert np.array_equal(np.asarray(result.image), np.asarray(out))


@pytest.mark.slow
def test_flex_compiles_once_per_shape_and_mask_kind(tiny_kontext_dir):
    """BlockMasks are data too: their tables and class table have shapes fixed by the token count."""
    ed = kontext(tiny_kontext_dir, {})
    image = make_image()
    start = graphs()
    first = ed.edit(image, P1, steps=4, switch=0.5, attention="flex", **FAST)
    assert graphs() - start == 2 and sum(first.attention.builds.values()) == 2
    start = graphs()
    ed.edit(image, P1, steps=4, switch=0.5, attention="flex", **FAST)
    ed.edit(image, P2, steps=4, switch=0.5, attention="flex", **FAST)
    assert graphs() - start == 0
    dense = kontext(tiny_kontext_dir).edit(image, P1, steps=4, switch=0.5, **FAST)
    assert np.abs(np.asarray(first.image, dtype=int) - np.asarray(dense.image, dtype=int)).max() <= 2


@pytest.mark.parametrize("family", ["qwen", "klein_base"])
def test_other_families_compile_whole_blocks_once(family, tmp_path, monkeypatch):
    """Qwen (true CFG: a masked and an unmasked pass of other lengths) and klein base (double + single blocks, CFG):
    full graphs (no graph breaks), a fixed number of them, none on later edits. Dynamo's eager backend: the graph
    count does not depend on the backend, and it keeps this test fast."""
    if family == "qwen":
        from replan.testing.qwen_image import save_tiny_qwen_edit, small_qwen_sizes

        small_qwen_sizes(monkeypatch)
        ed, options = load_editor("qwen", str(save_tiny_qwen_edit(tmp_path / "q")), device="cpu"), {}
    else:
        from replan.testing.klein import TINY_KLEIN_EDITOR_KWARGS, save_tiny_klein

        ed = load_editor("flux_klein_base", str(save_tiny_klein(tmp_path / "k")), device="cpu",
                         editor_kwargs={**TINY_KLEIN_EDITOR_KWARGS, "max_area": 128 * 128})
        options = FAST
    ed.pipe.set_progress_bar_config(disable=True)
    ed.compile(backend="eager")
    image = make_image()
    start = graphs()
    ed.edit(image, P1, steps=4, switch=0.5, **options)
    assert graphs() - start == 2 * (1 if family == "qwen" else 2)  # (masked, unmasked) x block classes
    start = graphs()
    ed.edit(image, P1, steps=4, switch=0.5, **options)
    same_length = RegionPlan("make it chilly", (Region((20, 30, 90, 80), "a tan cow"), Region((100, 20, 180, 120),
                                                                                              "a fog")))
    ed.edit(image, same_length if family == "qwen" else P2, steps=4, switch=0.5, **options)
    assert graphs() - start == 0


def test_flex_without_compile_warns_once(tiny_kontext_dir, caplog):
    ed = kontext(tiny_kontext_dir)
    with caplog.at_level("WARNING", logger="replan.backbones.base"):
        ed.edit(make_image(), P1, steps=1, attention="flex", **FAST)
        ed.edit(make_image(), P1, steps=1, attention="flex", **FAST)
    warnings = [r.getMessage() for r in caplog.records if "without --compile" in r.getMessage()]
    assert len(warnings) == 1 and "slower than dense" in warnings[0]
