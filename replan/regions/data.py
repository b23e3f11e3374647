"""Training data for the region generator: image–text rows from HF datasets or webdataset shards, decoded by the
trainer so that a bad image is skipped (and counted) instead of crashing an epoch; deterministic per-rank batches."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("replan.regions.train")


@dataclass
class DataConfig:
    path: str | None = None          # HF dataset id / save_to_disk dir / loader name (with data_files)
    data_files: str | list | None = None
    split: str = "train"
    webdataset: str | list | None = None  # tar shard glob(s) instead of ``path``
    image_column: str = "image"
    caption_column: str = "caption"
    max_samples: int | None = None
    num_workers: int = 0             # DataLoader workers decoding images



# ------------------------------------------------------------------------------------------------------- data
def decode_image(value):
    """bytes / {"bytes", "path"} / path / PIL → RGB PIL image and its raw bytes (None, None if undecodable)."""
    from PIL import Image

    try:
        raw = None
        if isinstance(value, dict):
            raw = value.get("bytes")
            value = raw if raw is not None else value.get("path")
        if isinstance(value, (bytes, bytearray)):
            raw = bytes(value)
            img = Image.open(io.BytesIO(raw))
        elif isinstance(value, str):
            raw = Path(value).read_bytes()
            img = Image.open(io.BytesIO(raw))
        elif isinstance(value, Image.Image):
            img = value
        else:
            return None, None
        img.load()
        return img.convert("RGB"), raw
    except Exception:  # noqa: BLE001  (any decoder failure means: skip the sample)
        return None, None


def load_image_text(cfg: DataConfig):
    import datasets

    image_col, caption_col = cfg.image_column, cfg.caption_column
    if cfg.webdataset:
        import glob

        shards = cfg.webdataset if isinstance(cfg.webdataset, list) else sorted(glob.glob(cfg.webdataset))
        if not shards:
            raise ValueError(f"data.webdataset {cfg.webdataset!r} matches no shard")
        ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train")
        if image_col == "image" and "image" not in ds.column_names:
            image_col = next((c for c in ("jpg", "jpeg", "png", "webp") if c in ds.column_names), image_col)
        if caption_col == "caption" and "caption" not in ds.column_names:
            caption_col = next((c for c in ("txt", "text") if c in ds.column_names), caption_col)
    elif cfg.path and Path(cfg.path).is_dir() and (Path(cfg.path) / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(cfg.path)
    elif cfg.path:
        ds = datasets.load_dataset(cfg.path, data_files=cfg.data_files, split=cfg.split)
    else:
        raise ValueError("set data.path (an HF dataset) or data.webdataset (tar shards)")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[cfg.split]
    for col in (image_col, caption_col):
        if col not in ds.column_names:
            raise ValueError(f"dataset has no column {col!r} (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features[image_col], datasets.Image):  # decode ourselves so a bad image is a skip, not a crash
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds, image_col, caption_col


class _Batches(torch.utils.data.Dataset):
    """Batch j of a fixed index order → (good samples, skip counts); decoding happens in DataLoader workers."""

    def __init__(self, ds, image_col, caption_col, batches):
        self.ds, self.image_col, self.caption_col, self.batches = ds, image_col, caption_col, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, j):
        good, skipped = [], {"empty_caption": 0, "bad_image": 0}
        for i in self.batches[j]:
            row = self.ds[int(i)]
            caption = row.get(self.caption_col)
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", "replace")
            if not isinstance(caption, str) or not caption.strip():
                skipped["empty_caption"] += 1
                continue
            img, raw = decode_image(row.get(self.image_col))
            if img is None:
                skipped["bad_image"] += 1
                continue
            good.append({"image": img, "bytes": raw, "caption": caption.strip()})
        return good, skipped


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    order = order[: n - n % world][rank::world].tolist()  # equal batch counts on every rank (DDP)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


