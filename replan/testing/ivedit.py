"""A tiny IV-Edit-format dataset built offline (synthetic images), saved in the hub layout for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

INSTRUCTIONS = [
    ("make the leftmost red square blue", "the leftmost red square", "Spatial", "Attribute Modification"),
    ("remove the circle that is not green", "the circle that is not green", "Attribute", "Object Removal"),
    ("replace the largest shape with a star", "the largest shape", "Comparative", "Object Replacement"),
    ("turn the picture into a night scene", "the whole picture", "Global", "Style Change"),
    ("add a hat to the second square from the right", "the second square from the right", "Spatial",
     "Object Addition"),
    ("change the text on the sign to OPEN", "the sign", "Text", "Text Editing"),
]


def _image(i: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = np.full((size[1], size[0], 3), rng.integers(120, 230, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size[0] - 30), rng.integers(0, size[1] - 30)
        arr[y : y + rng.integers(10, 30), x : x + rng.integers(10, 30)] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def tiny_ivedit_rows(n: int = 6, filtered: int = 1) -> list[dict]:
    """Rows with the IV-Edit columns; the last ``filtered`` rows carry ``status="filtered"``."""
    rows = []
    for i in range(n):
        instruction, referring, ref_type, task = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        extra = {"image_id": 1000 + i, "referring_expression": referring,
                 "instruction_details": {"editing_instruction": instruction, "referring_expression": referring,
                                         "referring_type": ref_type, "task_type": task}}
        rows.append({"image": _image(i, (160 + 16 * (i % 3), 120)), "prompt": instruction, "answer": "",
                     "extra_info": json.dumps(extra), "image_id": 1000 + i,
                     "status": "filtered" if i >= n - filtered else "ok"})
    return rows


def save_tiny_ivedit(path: str | Path, n: int = 6, filtered: int = 1,
                     splits: tuple[str, ...] = ("train", "dev", "test")) -> Path:
    """Write ``<path>/data/<split>-00000-of-00001.parquet`` for each split (the hub layout ``load_dataset(path)``
    reads); the splits hold the same rows, like IV-Edit's train/dev/test in shape (not in content)."""
    import datasets

    path = Path(path)
    (path / "data").mkdir(parents=True, exist_ok=True)
    rows = tiny_ivedit_rows(n, filtered)
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "extra_info": datasets.Value("string"),
                                  "image_id": datasets.Value("int64"), "status": datasets.Value("string")})
    ds = datasets.Dataset.from_list(rows, features=features)
    for split in splits:
        ds.to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path
