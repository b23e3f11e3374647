"""Loading what a GRPO run trains: the planner model (hub id, Hugging Face directory or ``tiny``) with its processor,
the LoRA config, the prompt-length filter of the dataset, and the merged copy of a LoRA-trained model."""

from __future__ import annotations

import logging
from pathlib import Path

from replan.train.config import LoraSection, ModelConfig, TrainConfig

logger = logging.getLogger("replan.train.grpo")


# ---------------------------------------------------------------------------------------------------- model
def resolve_model_path(path: str) -> str:
    """``"tiny"`` → the offline tiny checkpoint; a local directory must be a Hugging Face model (config.json);
    anything else is taken as a hub id. One-line ``ValueError`` naming what is wrong otherwise."""
    from replan.planner import TINY

    if path == TINY:
        from replan.backbones.registry import build_offline

        return str(build_offline("replan.testing.qwenvl:save_tiny_qwen25vl", "tiny-qwen25vl"))
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"model path {p} is a file, not a Hugging Face model directory")
        if (p / "config.json").is_file():
            return str(p)
        if (p / "fsdp_config.json").is_file() or any(p.glob("model_world_size_*_rank_*.pt")):
            raise ValueError(f"{p} is a sharded verl checkpoint, not a model: merge it first "
                             f"(scripts/train/merge.sh {p} <hf_dir>) and pass the merged directory")
        if (p / "adapter_config.json").is_file():
            raise ValueError(f"{p} is a LoRA adapter, not a model: pass the merged model ({p / 'merged'}) instead")
        if (p / "huggingface" / "config.json").is_file():
            raise ValueError(f"{p} is a verl actor checkpoint: merge it (scripts/train/merge.sh {p} <hf_dir>) first")
        raise ValueError(f"{p} is not a Hugging Face model directory (no config.json)")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"model path {path!r} does not exist (and is not a hub id like Qwen/Qwen2.5-VL-7B-Instruct)")
    return path


def dtype_of(name: str | None):
    import torch

    if name is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[name]


def load_model(cfg: ModelConfig):
    """``(model, processor)`` from a resolved path (see ``resolve_model_path``)."""
    from transformers import AutoModelForImageTextToText

    from replan.planner.qwen_vl import default_attention, load_processor

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.path, dtype=dtype_of(cfg.dtype), attn_implementation=cfg.attn_implementation or default_attention())
        processor = load_processor(cfg.path, cfg.min_pixels, cfg.max_pixels)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the planner from {cfg.path!r}: {' '.join(str(e).split())[:300]}") from None
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"{cfg.path!r} has no image processor: it is not a vision-language model")
    if cfg.freeze_vision_tower:
        tower = getattr(getattr(model, "model", model), "visual", None)
        if tower is None:
            raise ValueError("model.freeze_vision_tower: the model has no 'visual' tower")
        tower.requires_grad_(False)
    return model, processor


def peft_config(cfg: LoraSection):
    if not cfg.enabled:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("lora.enabled needs peft: pip install 'replan[train]'") from None
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------- data
def prompt_lengths(processor, dataset) -> list[int]:
    """Prompt tokens per row as the trainer will see them (chat template, image tokens included)."""
    lengths = []
    for row in dataset:
        content = [{"type": "image"}, {"type": "text", "text": row["prompt"][0]["content"]}]
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lengths.append(int(processor(text=[text], images=[row["image"]], return_tensors="pt")["input_ids"].shape[1]))
    return lengths


def build_dataset(cfg: TrainConfig, processor):
    """The TRL dataset, without the prompts longer than ``max_prompt_length`` (TRL never truncates prompts; verl's
    ``data.filter_overlong_prompts`` does the same)."""
    from replan.train.data import to_trl_dataset

    ds = to_trl_dataset(cfg.data)
    if cfg.max_prompt_length:
        lengths = prompt_lengths(processor, ds)
        keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_length]
        if len(keep) < len(ds):
            logger.warning("dropped %d of %d prompts longer than max_prompt_length=%d tokens (longest %d)",
                           len(ds) - len(keep), len(ds), cfg.max_prompt_length, max(lengths))
        if not keep:
            raise ValueError(f"every prompt is longer than max_prompt_length={cfg.max_prompt_length} tokens "
                             f"(shortest {min(lengths)}); raise it or lower model.max_pixels")
        ds = ds.select(keep)
    return ds


def merged_copy(peft_model, adapter_dir: Path, base: str | None = None):
    """The base model reloaded on the CPU with the adapter saved in ``adapter_dir`` merged in; the trained model is
    left as it is (``merge_and_unload`` on it would strip its adapter and double its memory on the GPU)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = base or peft_model.peft_config["default"].base_model_name_or_path
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=peft_model.dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
