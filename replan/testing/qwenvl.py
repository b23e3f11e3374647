"""A tiny, randomly initialised Qwen2.5-VL (model + processor) saved offline, for planner tests and the smoke path.

Random weights generate random tokens: a planner built on it exercises loading, the chat template, image
preprocessing, generation and decoding, and its replies fall back to a global edit through the lenient parser.
"""

from __future__ import annotations

from pathlib import Path

import torch

from replan.testing.tokenizers import tiny_qwen2_tokenizer

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen25vl(hidden: int = 16, seed: int = 0, min_pixels: int = 4 * 28 * 28, max_pixels: int = 64 * 28 * 28):
    """Return ``(model, processor)``: a 2-layer Qwen2.5-VL with a 2-block vision tower and a byte-level tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from replan.qwen_processor import ImageOnlyQwen2_5_VLProcessor

    tok = tiny_qwen2_tokenizer()
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|endoftext|>"]}
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                             chat_template=QWEN2_VL_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


def save_tiny_qwen25vl(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Save a tiny Qwen2.5-VL checkpoint directory (model, tokenizer, image processor, chat template)."""
    path = Path(path)
    model, processor = tiny_qwen25vl(seed=seed, **kwargs)
    model.generation_config.max_new_tokens = 64
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
