"""Tiny, randomly initialised FLUX.2 [klein] components, saved to a directory and loaded back like real weights.

The structure matches the real model (VAE factor 8, 32 latent channels patchified 2x2 into 128-channel tokens and
normalised by the VAE's BatchNorm statistics, a Qwen3 causal LM whose hidden states of three layers are stacked into
the text embedding, 4-axis RoPE, no guidance embedding); only the sizes are tiny. Random weights: outputs are noise,
but every shape, mask and code path is the real one.

The tiny Qwen3 has 3 layers, so the text embedding stacks layers ``TINY_KLEIN_OUT_LAYERS`` = (1, 2, 3) instead of the
pipeline's default (9, 18, 27). A saved pipeline does not record that choice (it is a call argument of
``Flux2KleinPipeline``, not configuration), so load it with
``editor_kwargs={"text_encoder_out_layers": TINY_KLEIN_OUT_LAYERS}``; ``TINY_KLEIN_EDITOR_KWARGS`` has it plus a small
``max_area`` for fast runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from replan.testing.tokenizers import tiny_qwen2_tokenizer

TINY_KLEIN_OUT_LAYERS = (1, 2, 3)
TINY_KLEIN_HIDDEN = 16
TINY_KLEIN_EDITOR_KWARGS = {"text_encoder_out_layers": TINY_KLEIN_OUT_LAYERS, "max_area": 128 * 128}

# A minimal Qwen3 chat template: honours ``add_generation_prompt`` and ``enable_thinking=False`` as the real one does.
QWEN3_SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_klein_components(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2,
                          distilled: bool = False) -> dict:
    """Components for ``Flux2KleinPipeline(**components, is_distilled=distilled)``.

    ``distilled`` does not change any weight (the flag lives in the pipeline config); it is accepted so that one call
    describes one checkpoint.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    del distilled
    tok = tiny_qwen2_tokenizer()
    tok.chat_template = QWEN3_SIMPLE_CHAT_TEMPLATE
    torch.manual_seed(seed)
    hidden, layers = TINY_KLEIN_HIDDEN, TINY_KLEIN_OUT_LAYERS
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=max(layers),
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    ))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden * len(layers),
        timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=32, norm_num_groups=4, sample_size=64, use_quant_conv=True, use_post_quant_conv=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    for m in (vae, text_encoder, transformer):
        m.eval()  # directly constructed models are in train mode
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def save_tiny_klein(path: str | Path, seed: int = 0, distilled: bool = False, **sizes) -> Path:
    """Build tiny klein components and ``save_pretrained`` them as a ``Flux2KleinPipeline`` directory.

    ``sizes``: ``num_layers`` / ``num_single_layers`` of the transformer. Returns the path.
    """
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    components = tiny_klein_components(seed, distilled=distilled, **sizes)
    Flux2KleinPipeline(**components, is_distilled=distilled).save_pretrained(path)
    return path
