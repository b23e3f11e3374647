"""Tiny, randomly initialised inpainting pipelines (SD inpaint, FLUX Fill), saved and loaded back like real weights.

SD inpaint: 9-channel UNet (4 noise + 1 mask + 4 masked-image latents), VAE factor 8 with 4 latent channels, CLIP
text encoder. The VAE has no mid-block attention so that the decoder is local apart from its GroupNorm statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from replan.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer


def _tiny_clip(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))


def _tiny_vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, mid_block_add_attention=False, **extra,
    )


def tiny_sd_inpaint_components(seed: int = 0) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    )
    vae = _tiny_vae(4, scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    text_encoder = _tiny_clip(tok)
    for m in (unet, vae, text_encoder):
        m.eval()
    return dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tok,
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def save_tiny_sd_inpaint(path: str | Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionInpaintPipeline

    path = Path(path)
    StableDiffusionInpaintPipeline(**tiny_sd_inpaint_components(seed)).save_pretrained(path)
    return path


def tiny_flux_fill_components(seed: int = 0) -> dict:
    """FLUX.1 Fill: 16 latent channels packed 2x2 (64) + packed masked-image latents (64) + packed mask (256)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    ))
    vae = _tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )
    text_encoder = _tiny_clip(tok)
    for m in (vae, text_encoder, text_encoder_2, transformer):
        m.eval()
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                tokenizer_2=tok2, transformer=transformer)


def save_tiny_flux_fill(path: str | Path, seed: int = 0) -> Path:
    from diffusers import FluxFillPipeline

    path = Path(path)
    FluxFillPipeline(**tiny_flux_fill_components(seed)).save_pretrained(path)
    return path
