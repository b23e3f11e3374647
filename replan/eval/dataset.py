"""IV-Edit and any dataset with the same columns, as ``EvalSample`` records.

Columns (the ``TainU/IV-Edit`` card): ``image`` (image), ``prompt`` (the instruction), ``extra_info`` (a JSON string
with ``image_id``, ``referring_expression`` and ``instruction_details{editing_instruction, referring_expression}``),
optionally ``status`` (rows marked ``"filtered"`` are skipped, as official) and category fields
(``referring_type``/``task_type``, top-level, in ``extra_info`` or in its ``instruction_details``).

    samples = load_samples("TainU/IV-Edit", "test")          # hub id (needs the network), or
    samples = load_samples("/data/iv-edit", "test")          # a local copy: HF layout, save_to_disk, parquet/json file
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from replan.images import to_rgb

logger = logging.getLogger(__name__)

DEFAULT_DATASET, DEFAULT_SPLIT = "TainU/IV-Edit", "test"
TINY_DATASET = "tiny"  # the offline fixture (replan.testing.ivedit), built once into $REPLAN_CACHE
CATEGORY_KEYS = ("referring_type", "task_type")


@dataclass
class EvalSample:
    image_id: str
    image: Image.Image
    instruction: str
    referring_expression: str = ""
    details: dict = field(default_factory=dict)  # the parsed extra_info
    status: str | None = None
    categories: dict = field(default_factory=dict)  # e.g. {"referring_type": "Spatial", "task_type": "..."}


def resolve_dataset(source: str) -> str:
    """``"tiny"`` → the offline fixture dataset's directory; anything else unchanged."""
    if source != TINY_DATASET:
        return source
    from replan.backbones.registry import build_offline

    return str(build_offline("replan.testing.ivedit:save_tiny_ivedit", "tiny-ivedit"))


def open_dataset(source: str = DEFAULT_DATASET, split: str = DEFAULT_SPLIT):
    """A ``datasets.Dataset``: a hub id, a ``save_to_disk`` directory, a directory in hub layout, a data file, or
    ``"tiny"`` (the offline fixture)."""
    import datasets

    source = resolve_dataset(source)
    path = Path(source)
    try:
        if path.is_dir() and (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        if path.is_dir() and (path / split / "state.json").is_file():
            return datasets.load_from_disk(str(path / split))
        if path.is_file():
            kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise ValueError(f"dataset file {path} must be .parquet, .json, .jsonl or .csv")
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(str(source), split=split)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:  # incl. an unreachable hub
        raise ValueError(f"cannot open dataset {source!r} (split {split!r}): {e}") from None


def _extra_info(row: dict) -> dict:
    extra = row.get("extra_info") or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            logger.warning("extra_info is not valid JSON; ignored: %.80s", extra)
            extra = {}
    return extra if isinstance(extra, dict) else {}


def to_sample(row: dict, index: int = 0) -> EvalSample:
    """One dataset row → ``EvalSample`` (``ValueError`` naming the missing column)."""
    for column in ("image", "prompt"):
        if column not in row:
            raise ValueError(f"dataset row {index} has no '{column}' column (need image, prompt, extra_info)")
    extra = _extra_info(row)
    details = extra.get("instruction_details") if isinstance(extra.get("instruction_details"), dict) else {}
    image_id = extra.get("image_id", row.get("image_id", index))
    referring = extra.get("referring_expression") or details.get("referring_expression") or ""
    categories = {}
    for key in CATEGORY_KEYS:
        value = row.get(key) or extra.get(key) or details.get(key)
        if value:
            categories[key] = str(value)
    image = row["image"]
    if not isinstance(image, Image.Image):
        raise ValueError(f"dataset row {index}: 'image' is not an image (got {type(image).__name__})")
    return EvalSample(
        image_id=str(image_id), image=to_rgb(image), instruction=str(row["prompt"]).strip(),
        referring_expression=str(referring), details=extra, status=row.get("status"), categories=categories,
    )


def load_samples(source: str = DEFAULT_DATASET, split: str = DEFAULT_SPLIT, limit: int | None = None,
                 rank: int = 0, world: int = 1) -> list[EvalSample]:
    """Samples of a split, skipping ``status == "filtered"``, then ``limit``, then shard ``rank`` of ``world``
    (``samples[rank::world]``, as official)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    dataset = open_dataset(source, split)
    samples = []
    for i, row in enumerate(dataset):
        if row.get("status") == "filtered":
            continue
        samples.append(to_sample(row, i))
        if limit is not None and len(samples) >= limit:
            break
    ids = [s.image_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {source!r} has duplicate image ids; every sample needs its own output folder")
    return samples[rank::world]
