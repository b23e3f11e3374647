"""Tiny, randomly initialised, offline components for tests, CI, benchmarks and the offline smoke path.

Nothing here downloads anything. Each ``save_tiny_*`` writes a directory that the real ``from_pretrained`` loads.
The names below are imported from their modules on first use, so that ``replan.testing.standins`` or
``replan.testing.tokenizers`` work where diffusers is not installed (CI's verl environment).
"""

from __future__ import annotations

import importlib

_HOMES = {
    "save_tiny_klein": "klein", "tiny_klein_components": "klein",
    "save_tiny_kontext": "kontext", "tiny_kontext_components": "kontext",
    "save_tiny_qwen_edit": "qwen_image", "small_qwen_sizes": "qwen_image", "tiny_qwen_edit_components": "qwen_image",
    "save_tiny_qwen25vl": "qwenvl", "tiny_qwen25vl": "qwenvl",
    "tiny_clip_tokenizer": "tokenizers", "tiny_qwen2_tokenizer": "tokenizers", "tiny_t5_tokenizer": "tokenizers",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'replan.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"replan.testing.{home}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
