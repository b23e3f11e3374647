"""Training data for the region generator: image–text rows, decoded by the trainer so that a bad image is skipped
(and counted) instead of crashing an epoch.

Two readers, one item format (``{"samples", "skipped", "state"}`` per batch, ``state`` = the position after it):

* map-style (``MapData``): an HF dataset in memory or on disk (``data.path``: hub id, ``save_to_disk`` dir, a loader
  name with ``data.data_files``, or ``tiny``) — a seeded global shuffle per epoch, deterministic per-rank batches,
  resumed by batch index. Fine for thousands of pairs.
* streaming (``replan.regions.stream.StreamData``): webdataset tar shards (``data.webdataset``) or an HF dataset read
  with ``data.streaming: true`` — shard by shard, per rank and DataLoader worker, resumed by shard and offset. For
  millions of pairs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from replan.regions.config import TINY_DATA as TINY
from replan.regions.config import DataConfig  # noqa: F401  (re-exported: the data section of the config)

logger = logging.getLogger("replan.regions.train")

SKIPS = ("empty_caption", "bad_image", "bad_shard")


def skip_counts() -> dict:
    return dict.fromkeys(SKIPS, 0)


# ------------------------------------------------------------------------------------------------------- rows
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


def pick_columns(names, image_col: str, caption_col: str) -> tuple[str, str]:
    """The default column names fall back to webdataset's extensions (jpg/png/…, txt) when absent."""
    names = list(names)
    if image_col == "image" and "image" not in names:
        image_col = next((c for c in ("jpg", "jpeg", "png", "webp") if c in names), image_col)
    if caption_col == "caption" and "caption" not in names:
        caption_col = next((c for c in ("txt", "text") if c in names), caption_col)
    return image_col, caption_col


def to_sample(row: dict, image_col: str, caption_col: str):
    """A row → ``({"image", "bytes", "caption"}, None)`` or ``(None, reason)`` with reason in ``SKIPS``."""
    caption = row.get(caption_col)
    if isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption).decode("utf-8", "replace")
    if not isinstance(caption, str) or not caption.strip():
        return None, "empty_caption"
    img, raw = decode_image(row.get(image_col))
    if img is None:
        return None, "bad_image"
    return {"image": img, "bytes": raw, "caption": caption.strip()}, None


# ------------------------------------------------------------------------------------------------- map-style
def load_image_text(cfg: DataConfig):
    """(dataset, image column, caption column) of a map-style source; images left undecoded."""
    import datasets

    if cfg.path == TINY:
        from replan.backbones.registry import build_offline

        ds = datasets.load_from_disk(str(build_offline("replan.testing.regions:save_tiny_image_text",
                                                       "tiny-image-text")))
    elif Path(cfg.path).is_dir() and (Path(cfg.path) / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(cfg.path)
    else:
        ds = datasets.load_dataset(cfg.path, data_files=cfg.data_files, split=cfg.split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[cfg.split]
    image_col, caption_col = pick_columns(ds.column_names, cfg.image_column, cfg.caption_column)
    for col in (image_col, caption_col):
        if col not in ds.column_names:
            raise ValueError(f"dataset has no column {col!r} (columns: {', '.join(ds.column_names)}); set "
                             f"data.image_column / data.caption_column")
    if isinstance(ds.features[image_col], datasets.Image):  # decode ourselves so a bad image is a skip, not a crash
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds, image_col, caption_col


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    order = order[: n - n % world][rank::world].tolist()  # equal batch counts on every rank (DDP)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class _Batches(torch.utils.data.Dataset):
    """Batch j of a fixed index order → an item; decoding happens in DataLoader workers."""

    def __init__(self, ds, image_col, caption_col, batches, first: int):
        self.ds, self.image_col, self.caption_col, self.batches, self.first = ds, image_col, caption_col, batches, first

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, j):
        good, skipped = [], skip_counts()
        for i in self.batches[j]:
            sample, reason = to_sample(self.ds[int(i)], self.image_col, self.caption_col)
            if sample is None:
                skipped[reason] += 1
            else:
                good.append(sample)
        return {"samples": good, "skipped": skipped, "state": {"batch_idx": self.first + j + 1}}


class MapData:
    """A map-style dataset split into seeded per-epoch, per-rank batches; position = batches done this epoch."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.cfg, self.batch_size, self.seed, self.rank, self.world = cfg, batch_size, seed, rank, world
        self.ds, self.image_col, self.caption_col = load_image_text(cfg)
        if len(self.ds) < world:
            raise ValueError(f"the dataset has {len(self.ds)} rows, fewer than the {world} processes")

    def batches_per_epoch(self) -> int:
        return len(epoch_batches(len(self.ds), self.batch_size, self.seed, 0, self.rank, self.world))

    def items(self, epoch: int, state: dict | None):
        first = (state or {}).get("batch_idx", 0)
        batches = epoch_batches(len(self.ds), self.batch_size, self.seed, epoch, self.rank, self.world)[first:]
        loader = torch.utils.data.DataLoader(_Batches(self.ds, self.image_col, self.caption_col, batches, first),
                                             batch_size=None, shuffle=False, num_workers=self.cfg.num_workers,
                                             generator=torch.Generator())  # keeps the global RNG untouched
        yield from loader


def open_data(cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """The reader for ``cfg``: ``StreamData`` for shards / streaming, ``MapData`` otherwise."""
    if cfg.webdataset or cfg.streaming:
        from replan.regions.stream import StreamData

        return StreamData(cfg, batch_size, seed, rank, world)
    return MapData(cfg, batch_size, seed, rank, world)
