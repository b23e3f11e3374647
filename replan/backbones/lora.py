"""Editor LoRAs (``--lora_path``): where a path points (file, directory or hub id) and loading it into a diffusers
pipeline as the official code does (``load_lora_weights`` with adapter ``"default"``)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# a hub repository id as the hub spells it: owner/name, letters, digits, "-", "_", "." (not first or last)
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?/[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def load_lora(pipe, lora_path: str, adapter_name: str = "default") -> None:
    """Load a LoRA into a diffusers editor pipeline as official: ``pipe.load_lora_weights(path, adapter_name=
    "default")``. ``lora_path``: a hub id, a directory holding ``pytorch_lora_weights.safetensors`` (what
    ``save_lora_weights`` writes) or one ``.safetensors`` file. ``ValueError`` naming the fix when the pipeline takes
    no LoRA, the path does not exist, or no weight of the file fits the editor (e.g. a planner adapter)."""
    name = type(pipe).__name__
    if not callable(getattr(pipe, "load_lora_weights", None)):
        raise ValueError(f"{name} cannot load LoRA weights (it has no load_lora_weights): drop --lora_path")
    source, kwargs = lora_source(lora_path)
    hint = ("--lora_path is a LoRA for the diffusion editor (diffusers format, e.g. written by "
            "save_lora_weights); a LoRA of the planner goes to --vlm_lora_path")
    try:
        pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
    except Exception as e:  # diffusers raises KeyError/ValueError/OSError/... for weights of another model
        reason = " ".join(str(e).split())[:300]  # diffusers' messages span several lines: one line here
        raise ValueError(f"cannot load the LoRA {lora_path} into {name}: {type(e).__name__}: {reason}. {hint}") from e
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        raise ValueError(f"the LoRA {lora_path} has no weight that fits {name}: nothing was loaded. {hint}")
    logger.info("loaded the editor LoRA %s as adapter %r", lora_path, adapter_name)


def lora_source(lora_path: str) -> tuple[str, dict]:
    """``(source, load_lora_weights kwargs)`` for a LoRA path: an existing file (its folder and ``weight_name``), an
    existing directory, or else a hub id ``owner/name`` (``FLUX.1-...`` names included); ``ValueError`` for anything
    else (a local path that does not exist, a weights file name that is not there)."""
    text = str(lora_path)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}
    if path.exists():
        return str(path), {}
    if _HUB_ID.fullmatch(text) and not text.endswith(_WEIGHT_SUFFIXES):
        return text, {}
    raise ValueError(f"editor LoRA {lora_path} does not exist (--lora_path takes a diffusers LoRA directory, "
                     "a .safetensors file or a hub id owner/name)")
