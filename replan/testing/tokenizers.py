"""Offline tokenizers built from in-memory vocabularies (no hub): CLIP, T5 and Qwen2 byte-level.

They tokenise real text deterministically, save with ``save_pretrained`` and load back with ``from_pretrained``,
which is all the tiny test pipelines need.
"""

from __future__ import annotations

import string

CHARS = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,:;!?'\"()[]{}<>-_/=+*#%&@ ")

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_clip_tokenizer(model_max_length: int = 77):
    """Character-level CLIP BPE tokenizer (every character plus its word-final ``</w>`` form)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        if c != " ":
            vocab.setdefault(c, len(vocab))
            vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """Character-level T5 Unigram tokenizer; ids 0, 1, 2 are pad, eos, unk as in the real one."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS if c != " "] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_qwen2_tokenizer(extra_special=()):
    """Byte-level Qwen2 tokenizer (256 byte symbols, no merges) with the Qwen special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL + list(extra_special)})
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    return tok
