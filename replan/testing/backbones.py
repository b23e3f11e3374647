"""The offline smoke backbones, registered into ``replan.backbones.registry`` when this module is imported (the
registry imports it, as one of its ``PLUGINS``, the first time it is asked for a name it does not know or for all
names): ``tiny`` (FLUX.1 Kontext), ``tiny_qwen`` (Qwen-Image-Edit) and ``tiny_klein`` (FLUX.2 klein base). Each is the
real family's spec and code path on tiny random components that a ``replan.testing`` builder saves on first use; the
output is noise. They work wherever a backbone name is taken: the CLI, the app, the edit server and the eval.
"""

from __future__ import annotations

from dataclasses import replace

from replan.backbones.registry import BACKBONES, register

MODEL_ID = "(built offline by replan.testing)"

TINY = register(replace(
    BACKBONES["flux_kontext"], name="tiny", model_id=MODEL_ID,
    description="TINY RANDOM FLUX.1 Kontext for offline smoke runs: the output is noise, every code path is real",
    builder="replan.testing:save_tiny_kontext", editor_kwargs={"max_area": 256 * 256}, dtype="float32",
))

# The same smoke path for the other families (random weights). Every tiny backbone edits at most 256x256 pixels of
# area (max_area), so a whole CLI run takes seconds on a CPU (benchmark/tiny_cli.py measures it).
TINY_QWEN = register(replace(
    BACKBONES["qwenimageedit"], name="tiny_qwen", model_id=MODEL_ID,
    description="TINY RANDOM Qwen-Image-Edit for offline smoke runs: the output is noise, every code path is real",
    builder="replan.testing.qwen_image:save_tiny_qwen_edit", dtype="float32", editor_kwargs={"max_area": 256 * 256},
))
TINY_KLEIN = register(replace(
    BACKBONES["flux_klein_base"], name="tiny_klein", model_id=MODEL_ID,
    description="TINY RANDOM FLUX.2 klein (base) for offline smoke runs: the output is noise, every code path is real",
    builder="replan.testing.klein:save_tiny_klein", dtype="float32",
    editor_kwargs={"text_encoder_out_layers": (1, 2, 3), "max_area": 256 * 256},
))

__all__ = ["TINY", "TINY_KLEIN", "TINY_QWEN"]
