"""Tiny, randomly initialised, offline components for tests, CI, benchmarks and the offline smoke path.

Nothing here downloads anything. Each ``save_tiny_*`` writes a directory that the real ``from_pretrained`` loads.
"""

from replan.testing.klein import save_tiny_klein, tiny_klein_components
from replan.testing.kontext import save_tiny_kontext, tiny_kontext_components
from replan.testing.qwen_image import save_tiny_qwen_edit, small_qwen_sizes, tiny_qwen_edit_components
from replan.testing.qwenvl import save_tiny_qwen25vl, tiny_qwen25vl
from replan.testing.tokenizers import tiny_clip_tokenizer, tiny_qwen2_tokenizer, tiny_t5_tokenizer

__all__ = [
    "save_tiny_klein", "save_tiny_kontext", "save_tiny_qwen25vl", "save_tiny_qwen_edit", "small_qwen_sizes",
    "tiny_clip_tokenizer", "tiny_klein_components", "tiny_kontext_components", "tiny_qwen25vl",
    "tiny_qwen2_tokenizer", "tiny_qwen_edit_components", "tiny_t5_tokenizer",
]
