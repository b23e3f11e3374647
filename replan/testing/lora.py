"""A tiny random LoRA for an editor's transformer, built offline with peft and saved in diffusers' LoRA format.

    save_tiny_editor_lora("out/lora", "path/to/tiny_kontext")   # → out/lora/pytorch_lora_weights.safetensors

The file is what ``FluxKontextPipeline.save_lora_weights`` (or any other ``*LoraLoaderMixin``) writes, so
``pipe.load_lora_weights(dir)`` — and ``--lora_path dir`` — load it like a real LoRA. ``lora_B`` is random (peft's
default initialises it to zero, which would make the adapter a no-op).
"""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def save_tiny_editor_lora(path: str | Path, pipeline_dir: str | Path, pipeline_class: str = "FluxKontextPipeline",
                          rank: int = 2, seed: int = 1, targets=TARGETS) -> Path:
    """Build a rank-``rank`` LoRA over ``targets`` of the saved pipeline's transformer and save it to ``path``.

    ``lora_alpha`` equals the rank, so the loaded adapter adds exactly ``B @ A`` to each target weight."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cls = getattr(diffusers, pipeline_class)
    transformer = cls.from_pretrained(pipeline_dir).transformer
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, transformer, adapter_name="tiny")
    state = get_peft_model_state_dict(transformer, adapter_name="tiny")
    path = Path(path)
    cls.save_lora_weights(path, transformer_lora_layers=state)
    return path
