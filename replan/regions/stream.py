"""Streaming image–text data: webdataset tar shards or an HF dataset in streaming mode, read shard by shard.

    data = StreamData(cfg, batch_size=32, seed=0, rank=acc.process_index, world=acc.num_processes)
    for item in data.items(epoch, state):      # item = {"samples", "skipped", "state"}; state: where to resume
        ...

* **Shards.** ``data.webdataset``: tar files (a glob, a ``{0000..0999}`` range, or a list; local paths or any URL
  fsspec opens, e.g. ``hf://datasets/<id>/<file>.tar``), read with ``tarfile`` as a stream: consecutive members with
  the same key (the name up to the first dot) form a sample, the rest of the name is the column (``jpg``, ``txt``).
  ``data.path`` + ``data.streaming``: ``datasets.load_dataset(..., streaming=True)`` with decoding off; its shards are
  the dataset's own (``num_shards``, usually one per file).
* **Readers.** Every (process, DataLoader worker) pair is one reader; with R readers, reader k reads the epoch's shard
  order (seeded shuffle) ``[k::R]``, so no two readers see the same row. A reader fills a batch with ``batch_size``
  usable samples; bad rows (no caption, undecodable image) are skipped and counted; a shard that fails mid-way
  (truncated tar, network error) is counted as ``bad_shard`` and the reader moves on.
* **Exact resume.** A reader's position is (index in its shard list, rows read in that shard); every batch carries
  the position after it. A resumed reader reopens its shard and skips that many rows. The DataLoader cycles over
  its workers in a fixed order; an exhausted reader keeps answering its turn with an end marker, so the order never
  depends on timing, and a resumed run starts the cycle where the interrupted one stood (``state["next"]``).
  Checkpoints therefore continue bit for bit; a reader re-reads at most the part of one shard before its offset.
"""

from __future__ import annotations

import glob
import itertools
import logging
import posixpath
import re
import tarfile

import torch

from replan.regions.data import DataConfig, pick_columns, skip_counts, to_sample

logger = logging.getLogger("replan.regions.train")
IMAGE_EXTS, CAPTION_EXTS = ("jpg", "jpeg", "png", "webp"), ("txt", "text")


# ---------------------------------------------------------------------------------------------------- shards
def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` → a00bx, a00by, …, a02by (numeric ranges keep zero padding)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        width, lo, hi = len(r.group(1)), int(r.group(1)), int(r.group(2))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def list_shards(spec) -> list[str]:
    """Shard paths/URLs from a pattern or list: braces expanded, globs matched (local, or fsspec for URLs)."""
    shards = []
    for pattern in ([spec] if isinstance(spec, str) else list(spec)):
        for p in expand_braces(str(pattern)):
            if not any(ch in p for ch in "*?["):
                shards.append(p)
            elif "://" in p:
                import fsspec

                fs, _, paths = fsspec.get_fs_token_paths(p)
                protocol = p.split("://", 1)[0]
                shards += sorted(f"{protocol}://{q}" if "://" not in q else q for q in paths)
            else:
                shards += sorted(glob.glob(p))
    return shards


def iter_tar(url: str):
    """Samples of one webdataset tar, in file order: ``{"__key__": key, ext: bytes, …}``."""
    import fsspec

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        key, sample = None, {}
        for member in tf:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            if posixpath.join(folder, stem) != key:  # a new sample starts: the previous one is complete
                if sample:
                    yield sample
                key, sample = posixpath.join(folder, stem), {"__key__": posixpath.join(folder, stem)}
            sample[ext.lower()] = tf.extractfile(member).read()
        if sample:
            yield sample


class TarShards:
    """webdataset shards: shard i is the i-th tar."""

    def __init__(self, spec, image_col: str, caption_col: str):
        self.urls = list_shards(spec)
        if not self.urls:
            raise ValueError(f"data.webdataset {spec!r} matches no shard")
        self.image_col, self.caption_col = image_col, caption_col
        self.num_shards = len(self.urls)

    def rows(self, i: int, skip: int):
        rows = iter_tar(self.urls[i])
        yield from itertools.islice(rows, skip, None)

    def columns(self, row: dict) -> tuple[str, str]:
        image = self.image_col if self.image_col != "image" else next(
            (e for e in (*IMAGE_EXTS, "image") if e in row), "image")
        caption = self.caption_col if self.caption_col != "caption" else next(
            (e for e in (*CAPTION_EXTS, "caption") if e in row), "caption")
        return image, caption

    def name(self, i: int) -> str:
        return self.urls[i]


class HFShards:
    """An HF dataset in streaming mode (decoding off); shard i is ``ds.shard(num_shards, i)``."""

    def __init__(self, cfg: DataConfig):
        import datasets

        try:
            ds = datasets.load_dataset(cfg.path, data_files=cfg.data_files, split=cfg.split, streaming=True)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"cannot stream data.path={cfg.path!r}: {' '.join(str(e).split())[:300]}") from None
        self.ds = ds.decode(False)
        self.num_shards = int(ds.num_shards)
        names = list(ds.features) if ds.features is not None else None
        self.image_col, self.caption_col = cfg.image_column, cfg.caption_column
        if names is not None:
            self.image_col, self.caption_col = pick_columns(names, cfg.image_column, cfg.caption_column)
            for col in (self.image_col, self.caption_col):
                if col not in names:
                    raise ValueError(f"dataset {cfg.path!r} has no column {col!r} (columns: {', '.join(names)}); "
                                     f"set data.image_column / data.caption_column")

    def rows(self, i: int, skip: int):
        shard = self.ds.shard(num_shards=self.num_shards, index=i, contiguous=True)
        if skip:
            shard = shard.skip(skip)
        # .iter, not iter(): inside a DataLoader worker, iter() would split the shard again between the workers
        for batch in shard.iter(batch_size=1):
            yield {k: v[0] for k, v in batch.items()}

    def columns(self, row: dict) -> tuple[str, str]:
        return pick_columns(row, self.image_col, self.caption_col)

    def name(self, i: int) -> str:
        return f"shard {i}/{self.num_shards}"


# ---------------------------------------------------------------------------------------------------- readers
class _ReaderBatches(torch.utils.data.IterableDataset):
    """One process's readers; DataLoader worker w runs reader ``rank·W + (w + first) % W``."""

    def __init__(self, source, order, batch_size, rank, workers, world, quota, positions, first):
        self.source, self.order, self.batch_size = source, order, batch_size
        self.rank, self.workers, self.world, self.quota = rank, workers, world, quota
        self.positions, self.first = positions, first

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local = ((info.id if info else 0) + self.first) % self.workers
        return self.read(self.rank * self.workers + local, local)

    def read(self, reader: int, local: int):
        mine = self.order[reader::self.world * self.workers]
        pos = dict(self.positions.get(local) or {"shard": 0, "offset": 0, "rows": 0})
        batch, skipped = [], skip_counts()

        def item(done=False):
            return {"samples": batch, "skipped": skipped, "local": local, "end": done, "position": dict(pos)}

        while pos["shard"] < len(mine) and not (self.quota and pos["rows"] >= self.quota):
            index = mine[pos["shard"]]
            try:
                for row in self.source.rows(index, pos["offset"]):
                    pos["offset"] += 1
                    pos["rows"] += 1
                    sample, reason = to_sample(row, *self.source.columns(row))
                    if sample is None:
                        skipped[reason] += 1
                    else:
                        batch.append(sample)
                    if len(batch) == self.batch_size:
                        yield item()
                        batch, skipped = [], skip_counts()
                    if self.quota and pos["rows"] >= self.quota:
                        break
            except Exception as e:  # noqa: BLE001 - a broken shard (truncated tar, I/O error) is a skip, not a crash
                skipped["bad_shard"] += 1
                logger.warning("skipping the rest of %s after %d rows: %s", self.source.name(index), pos["offset"],
                               " ".join(str(e).split())[:200])
            if not (self.quota and pos["rows"] >= self.quota):
                pos["shard"], pos["offset"] = pos["shard"] + 1, 0
        if batch or any(skipped.values()):
            yield item()
            batch, skipped = [], skip_counts()
        while True:  # keep answering this reader's turn: the worker cycle never changes
            yield item(done=True)


class StreamData:
    """Shards → per-rank, per-worker readers with exact resume (see the module docstring)."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.cfg, self.batch_size, self.seed, self.rank, self.world = cfg, batch_size, seed, rank, world
        if cfg.webdataset:
            self.source = TarShards(cfg.webdataset, cfg.image_column, cfg.caption_column)
        else:
            self.source = HFShards(cfg)
        self.workers = max(1, cfg.num_workers)
        n, readers = self.source.num_shards, world * self.workers
        if n < world:
            raise ValueError(f"the data has {n} shard(s) but training runs {world} processes: each process needs "
                             f"at least one shard (write more, smaller shards)")
        if n < readers:
            logger.warning("%d shards for %d readers (%d processes x %d workers): %d workers will idle", n, readers,
                           world, self.workers, readers - n)
        self.quota = -(-cfg.max_samples // readers) if cfg.max_samples else None

    def shard_order(self, epoch: int) -> list[int]:
        if not self.cfg.shuffle_shards:
            return list(range(self.source.num_shards))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.source.num_shards, generator=g).tolist()

    def items(self, epoch: int, state: dict | None):
        """Batches of this process for ``epoch`` from ``state`` on; stops when every reader of the process is done."""
        state = state or {}
        positions = {int(k): v for k, v in (state.get("positions") or {}).items()}
        first = int(state.get("next", 0))
        ended = set(int(k) for k in state.get("ended", ()))
        if len(ended) == self.workers:
            return
        data = _ReaderBatches(self.source, self.shard_order(epoch), self.batch_size, self.rank, self.workers,
                              self.world, self.quota, positions, first)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=self.cfg.num_workers,
                                             generator=torch.Generator())
        for raw in loader:
            local = raw["local"]
            positions[local] = raw["position"]
            first = (local + 1) % self.workers
            if raw["end"]:
                ended.add(local)
                if len(ended) == self.workers:
                    return
                continue
            yield {"samples": raw["samples"], "skipped": raw["skipped"],
                   "state": {"positions": dict(positions), "next": first, "ended": sorted(ended)}}
