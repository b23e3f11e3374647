"""Memory options: stage offload between planner and editor, and diffusers' CPU offload inside the editor."""

import numpy as np
import pytest
import torch
from PIL import Image

from replan.backbones import load_editor
from replan.pipeline import RePlanPipeline
from replan.plan import Region, RegionPlan

PLAN = RegionPlan("make it warm", (Region((10, 10, 70, 60), "a red cat"),))


def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))


def test_model_cpu_offload_gives_the_same_edit(tiny_kontext_dir):
    kwargs = dict(device="cpu", editor_kwargs={"max_area": 128 * 128})
    plain = load_editor("flux", str(tiny_kontext_dir), **kwargs)
    offloaded = load_editor("flux", str(tiny_kontext_dir), offload="model", **kwargs)
    a = plain.edit(image(), PLAN, steps=2, max_sequence_length=16).image
    b = offloaded.edit(image(), PLAN, steps=2, max_sequence_length=16).image
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_offload_options_are_checked(tiny_kontext_dir):
    with pytest.raises(ValueError, match="offload must be"):
        load_editor("flux", str(tiny_kontext_dir), device="cpu", offload="disk")
    with pytest.raises(ValueError, match="stage_offload must be"):
        RePlanPipeline.from_pretrained("tiny", planner=None, stage_offload="gpu")
    with pytest.raises(ValueError, match="not both"):
        RePlanPipeline.from_pretrained("tiny", planner=None, stage_offload="cpu", offload="model")


@pytest.mark.gpu
def test_stage_offload_keeps_only_the_active_stage_on_the_gpu():
    pipe = RePlanPipeline.from_pretrained("tiny", planner="local", vlm_ckpt_path="tiny", device="cuda",
                                          stage_offload="cpu")
    assert pipe.editor.pipe.transformer.device.type == "cpu" and pipe.planner.device.type == "cpu"
    pipe.plan(image(), "make the cup green")
    assert pipe.planner.device.type == "cuda" and pipe.editor.pipe.transformer.device.type == "cpu"
    pipe(image(), plan=PLAN, steps=2)
    assert pipe.planner.device.type == "cpu" and pipe.editor.pipe.transformer.device.type == "cuda"
    assert torch.cuda.memory_allocated() > 0


def test_dtypes_per_device():
    from replan.backbones.base import resolve_dtype

    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cuda")
