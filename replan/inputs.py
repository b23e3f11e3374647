"""Checking a user's inputs before any model loads: image files, plan files, instructions and edit options.

Every check raises ``ValueError`` with one line that names the problem and the fix (CLI flags where a flag is the
fix); none of them loads a model, so entry points call them first and fail in the first second.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from replan.images import MAX_PIXELS, MIN_SIDE, check_image_size, load_image
from replan.plan import RegionPlan

DTYPES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
MAX_SEED = 2**63


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(W, H) from the file header, without decoding the pixels; ``ValueError`` if it is not a readable image."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"image file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"image {path} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def read_image(path: str | Path, max_aspect: float | None = None) -> Image.Image:
    """Open, size-check (before decoding) and decode an image file to RGB."""
    w, h = image_size_of(path)
    try:
        check_image_size((w, h))
        if max_aspect is not None and max(w / h, h / w) > max_aspect:
            raise ValueError(f"image is {w}x{h}, an aspect ratio of {max(w / h, h / w):.1f}:1; this backbone "
                             f"takes at most {max_aspect:g}:1 (crop it first)")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return load_image(path)


def read_plan(path: str | Path, image_size: tuple[int, int]) -> RegionPlan:
    """Load a plan file and check it against the image it will be executed on."""
    plan = RegionPlan.load(path)  # ValueError naming the file on a missing file, bad JSON or a bad field
    if plan.image_size is None:
        plan = RegionPlan(plan.global_prompt, plan.regions, plan.reasoning, tuple(image_size), plan.raw_text,
                          plan.repairs)
    w, h = image_size
    if tuple(plan.image_size) != (w, h):
        pw, ph = plan.image_size
        raise ValueError(f"plan file {path} was made for a {pw}x{ph} image but the image is {w}x{h}: pass the "
                         "image it was made for, or plan again (without --plan)")
    try:
        plan.check_image((w, h))
    except ValueError as e:
        raise ValueError(f"plan file {path}: {e}") from None
    for i, region in enumerate(plan.regions, 1):  # partly outside is fine: expanded, then clamped (official)
        x1, y1, x2, y2 = region.bbox
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            box = "[" + ", ".join(f"{v:g}" for v in region.bbox) + "]"
            raise ValueError(f"plan file {path}: region {i} box {box} lies entirely outside the {w}x{h} image; "
                             f"edit its bbox in the file so that it overlaps 0..{w} x 0..{h}")
    return plan


def check_instruction(instruction: str | None, fix: str = "pass --instruction") -> str:
    """The stripped instruction; ``ValueError`` when it is missing or blank."""
    if instruction is None or not str(instruction).strip():
        raise ValueError(f"the instruction is empty: {fix}")
    return str(instruction).strip()


def check_number(name: str, value, *, minimum: float | None = None, above: float | None = None,
                 integer: bool = False, maximum: float | None = None) -> None:
    """``ValueError`` naming ``name`` (a flag) unless ``value`` is None or a finite number within the bounds."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value:g}")


def check_edit_options(spec, *, steps=None, guidance=None, expand=None, switch=None, seed=None) -> None:
    """The numeric edit options against a backbone spec (``replan.backbones.registry.BackboneSpec``)."""
    check_number("--steps", steps, minimum=1, integer=True, maximum=10_000)
    check_number("--seed", seed, minimum=0, integer=True, maximum=MAX_SEED - 1)
    check_number("--expand", expand, minimum=0)
    check_number("--switch_ratio", switch, minimum=0)
    check_number("--guidance", guidance, minimum=0)
    family = getattr(spec, "family", "")
    if family == "qwen_image_edit":
        if guidance is not None:
            raise ValueError(f"{spec.name} has no embedded guidance: drop --guidance (true CFG "
                             f"{spec.true_cfg:g} is built in)")
        if steps is not None and steps < 2:
            raise ValueError(f"{spec.name} needs --steps >= 2 (its scheduler stretches sigmas to a terminal value)")
    if family == "flux2_klein" and spec.true_cfg is None and guidance is not None and guidance > 1:
        raise ValueError(f"{spec.name} is step-distilled and ignores guidance: drop --guidance (or use a base "
                         "checkpoint such as flux_klein_base)")
    if switch is not None and switch > 1 and steps is not None and switch > steps:
        raise ValueError(f"--switch_ratio {switch:g} is an absolute step past the last of --steps {steps}: use a "
                         f"ratio <= 1 or a step <= {steps}")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and str(dtype).lower() not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not known: use bf16, fp16 or fp32")


def check_device(device: str | None, dtype: str | None = None) -> str:
    """The device to use (default: cuda when available, else cpu); ``ValueError`` when it does not exist here."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but no CUDA device is visible: use --device cpu, "
                             "or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif parsed.type != "cpu" and parsed.type != "mps":
        raise ValueError(f"--device {device!r} is not supported: use cpu or cuda")
    if parsed.type == "cpu" and dtype is not None and str(dtype).lower() in ("fp16", "float16"):
        raise ValueError("--dtype fp16 does not work on the CPU: use fp32 (or bf16) there, fp16 on a GPU")
    return device


__all__ = ["DTYPES", "MAX_PIXELS", "MIN_SIDE", "check_device", "check_dtype", "check_edit_options",
           "check_instruction", "check_number", "image_size_of", "read_image", "read_plan"]
