"""Tiny randomly initialised CLIP and DINO checkpoints, and tiny Emu Edit / MagicBrush fixtures, built offline.

The checkpoints are saved with ``save_pretrained`` and meant to be loaded back with the real ``from_pretrained``
(``replan.regions.metrics.ClipScorer`` / ``DinoScorer``); the fixtures have the columns / file layout of the real
benchmarks (``replan.regions.benchmarks``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

EMU_TASKS = ("background", "global", "style", "remove", "add", "local", "texture")


def tiny_clip(seed: int = 0, image_size: int = 32, hidden: int = 32, projection: int = 16):
    """(CLIPModel, CLIPImageProcessorPil, CLIPTokenizer) with random weights; character-level tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from replan.testing.tokenizers import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": hidden,
                       "intermediate_size": 2 * hidden, "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=projection)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    return model, processor, tokenizer


def save_tiny_clip(path: str | Path, seed: int = 0, **sizes) -> Path:
    path = Path(path)
    model, processor, tokenizer = tiny_clip(seed, **sizes)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_dino(seed: int = 0, image_size: int = 32, hidden: int = 32):
    """A ``ViTModel`` shaped like DINO ViT-S/16 in miniature (random weights)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, qkv_bias=True)
    return ViTModel(config, add_pooling_layer=False).eval()


def save_tiny_dino(path: str | Path, seed: int = 0, **sizes) -> Path:
    path = Path(path)
    tiny_dino(seed, **sizes).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- images
def synthetic_image(seed: int, size=(64, 48)) -> Image.Image:
    """A flat background with a few coloured rectangles (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), rng.integers(100, 230, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
        arr[y : y + rng.integers(6, 12), x : x + rng.integers(6, 12)] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def edited_image(image: Image.Image, seed: int) -> Image.Image:
    """``image`` with one extra rectangle painted in: a plausible "edit"."""
    rng = np.random.default_rng(10_000 + seed)
    arr = np.asarray(image.convert("RGB")).copy()
    h, w = arr.shape[:2]
    x, y = rng.integers(0, max(1, w - 16)), rng.integers(0, max(1, h - 16))
    arr[y : y + 14, x : x + 14] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


# ---------------------------------------------------------------------------------------------------- Emu Edit
def tiny_emu_rows(n: int = 4) -> list[dict]:
    """Rows with the ``facebook/emu_edit_test_set`` columns; the last row has an empty input caption."""
    rows = []
    for i in range(n):
        rows.append({"instruction": f"add a red box number {i}", "image": synthetic_image(i),
                     "task": EMU_TASKS[i % len(EMU_TASKS)], "split": "test", "idx": 100 + i, "hash": f"h{i:04d}",
                     "input_caption": "" if i == n - 1 else f"a picture with boxes {i}",
                     "output_caption": f"a picture with boxes and a red box {i}"})
    return rows


def save_tiny_emu(path: str | Path, n: int = 4, splits=("validation", "test")) -> Path:
    """``<path>/data/<split>-00000-of-00001.parquet`` (hub layout)."""
    import datasets

    path = Path(path)
    (path / "data").mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"instruction": datasets.Value("string"), "image": datasets.Image(),
                                  "task": datasets.Value("string"), "split": datasets.Value("string"),
                                  "idx": datasets.Value("int64"), "hash": datasets.Value("string"),
                                  "input_caption": datasets.Value("string"),
                                  "output_caption": datasets.Value("string")})
    ds = datasets.Dataset.from_list(tiny_emu_rows(n), features=features)
    for split in splits:
        ds.to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path


# ---------------------------------------------------------------------------------------------------- MagicBrush
def tiny_magicbrush_sessions(turns=(1, 2, 3)) -> dict[str, list[Image.Image]]:
    """Session id → [input, GT output 1, GT output 2, ...] (each GT output edits the previous one)."""
    sessions = {}
    for s, n in enumerate(turns):
        images = [synthetic_image(50 + s, (56, 56))]
        for t in range(n):
            images.append(edited_image(images[-1], 100 * s + t))
        sessions[str(300 + s)] = images
    return sessions


def save_tiny_magicbrush(path: str | Path, turns=(1, 2, 3), layout: str = "official") -> Path:
    """The MagicBrush test set in miniature.

    ``layout="official"``: the released test folder — ``edit_sessions.json`` ({session: [{"input", "mask", "output",
    "instruction"}, ...]}) and ``images/<session>/<session>-input.png``, ``-output<t>.png``, ``-mask<t>.png``.
    ``layout="hf"``: the ``osunlp/MagicBrush`` columns (``img_id, turn_index, source_img, mask_img, instruction,
    target_img``), as ``<path>/data/test-00000-of-00001.parquet``."""
    path = Path(path)
    sessions = tiny_magicbrush_sessions(turns)
    if layout == "official":
        meta = {}
        for sid, images in sessions.items():
            folder = path / "images" / sid
            folder.mkdir(parents=True, exist_ok=True)
            images[0].save(folder / f"{sid}-input.png")
            meta[sid] = []
            for t in range(1, len(images)):
                images[t].save(folder / f"{sid}-output{t}.png")
                Image.new("L", images[t].size, 255).save(folder / f"{sid}-mask{t}.png")
                src = f"{sid}-input.png" if t == 1 else f"{sid}-output{t - 1}.png"
                meta[sid].append({"input": src, "mask": f"{sid}-mask{t}.png", "output": f"{sid}-output{t}.png",
                                  "instruction": f"paint box {t} of session {sid}"})
        (path / "edit_sessions.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return path
    if layout != "hf":
        raise ValueError(f"layout must be 'official' or 'hf', got {layout!r}")
    import datasets

    rows = []
    for sid, images in sessions.items():
        for t in range(1, len(images)):
            rows.append({"img_id": sid, "turn_index": t, "source_img": images[t - 1],
                         "mask_img": Image.new("RGB", images[t].size, (255, 255, 255)),
                         "instruction": f"paint box {t} of session {sid}", "target_img": images[t]})
    features = datasets.Features({"img_id": datasets.Value("string"), "turn_index": datasets.Value("int32"),
                                  "source_img": datasets.Image(), "mask_img": datasets.Image(),
                                  "instruction": datasets.Value("string"), "target_img": datasets.Image()})
    (path / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path / "data" / "test-00000-of-00001.parquet"))
    return path
