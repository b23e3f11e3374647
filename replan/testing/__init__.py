"""Tiny, randomly initialised, offline components for tests, CI, benchmarks and the offline smoke path.

Nothing here downloads anything. Each ``save_tiny_*`` writes a directory that the real ``from_pretrained`` loads.
"""

from replan.testing.kontext import save_tiny_kontext, tiny_kontext_components
from replan.testing.tokenizers import tiny_clip_tokenizer, tiny_qwen2_tokenizer, tiny_t5_tokenizer

__all__ = ["save_tiny_kontext", "tiny_clip_tokenizer", "tiny_kontext_components", "tiny_qwen2_tokenizer",
           "tiny_t5_tokenizer"]
