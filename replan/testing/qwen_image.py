"""Tiny, randomly initialised Qwen-Image-Edit / EditPlus components, saved and loaded back like real weights.

The text encoder is the tiny Qwen2.5-VL of ``replan.testing.qwenvl`` (it sees the image, as the real one does); the
transformer has the real block structure (double-stream only, complex RoPE, optional ``zero_cond_t`` as in 2511).
The pipelines resize references to ~1 MP through module constants; tests shrink them with
``small_qwen_sizes(monkeypatch)`` so a run takes a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from replan.testing.qwenvl import tiny_qwen25vl


def tiny_qwen_edit_components(seed: int = 0, num_layers: int = 2, zero_cond_t: bool = False) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    text_encoder, processor = tiny_qwen25vl(hidden=16, seed=seed)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    )
    z = 16
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * z,
                                 latents_std=[1.0] * z)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
    )
    for m in (vae, text_encoder, transformer):
        m.eval()
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                tokenizer=processor.tokenizer, processor=processor)


def save_tiny_qwen_edit(path: str | Path, plus: bool = False, seed: int = 0, **kwargs) -> Path:
    """Save a tiny ``QwenImageEditPipeline`` (or ``QwenImageEditPlusPipeline`` with ``plus=True``) directory."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    path = Path(path)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    cls(**tiny_qwen_edit_components(seed, **kwargs)).save_pretrained(path)
    # record the processor as the real checkpoints do (transformers' Qwen2VLProcessor); replan's loader falls back to
    # an image-only processor when the video processor cannot be built (no torchvision)
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def small_qwen_sizes(monkeypatch, area: int = 128 * 128, condition_area: int = 64 * 64) -> None:
    """Shrink the ~1 MP reference sizes of the Qwen edit pipelines (module constants) for fast tests."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda target_area, ratio: original(area, ratio))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", area)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", condition_area)
