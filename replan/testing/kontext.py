"""Tiny, randomly initialised FLUX.1 Kontext components, saved to a directory and loaded back like real weights.

The structure matches the real model (VAE factor 8, 16 latent channels packed 2x2 into 64-channel tokens, CLIP pooled
+ T5 sequence, guidance embedding, 3-axis RoPE); only the sizes are tiny. Random weights: outputs are noise, but
every shape, mask and code path is the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from replan.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer


def tiny_kontext_components(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )
    for m in (vae, text_encoder, text_encoder_2, transformer):
        m.eval()  # directly constructed models are in train mode (T5 dropout would make runs non-deterministic)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                tokenizer_2=tok2, transformer=transformer, image_encoder=None, feature_extractor=None)


def save_tiny_kontext(path: str | Path, seed: int = 0, **sizes) -> Path:
    """Build tiny Kontext components and ``save_pretrained`` them as a pipeline directory; returns the path."""
    from diffusers import FluxKontextPipeline

    path = Path(path)
    FluxKontextPipeline(**tiny_kontext_components(seed, **sizes)).save_pretrained(path)
    return path
