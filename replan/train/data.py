"""GRPO training data: IV-Edit ``train``/``dev`` (or any dataset with the same columns, incl. the ``tiny`` fixture)
as (a) a ``datasets.Dataset`` for TRL's ``GRPOTrainer`` or (b) verl's multimodal parquet.

The prompt is exactly the one the planner sends at inference (``replan.planner.base.build_prompt``): one user turn,
the image first, then ``template + "\\n" + instruction``; the chat template adds Qwen's default system turn.

* TRL rows: ``prompt`` = ``[{"role": "user", "content": <prompt text>}]`` (TRL puts the ``image`` column's picture
  in front of the text itself), ``image`` (RGB), and the reward columns ``instruction`` (what the edit server gets),
  ``referring_expression``, ``image_id``, ``width``, ``height``, plus ``template`` / ``template_sha256`` (which
  planner prompt built the row).
* verl rows (``verl/utils/dataset/rl_dataset.py::RLHFDataset``): ``data_source``, ``prompt`` =
  ``[{"role": "user", "content": "<image>" + <prompt text>}]``, ``images`` = ``[{"bytes": ...}]``, ``ability``,
  ``reward_model`` = ``{"style": "rule" | "model", "ground_truth": answer}``, ``extra_info`` (``index``, ``split``,
  ``instruction``, ``referring_expression``, ``image_id``, ``width``, ``height``, ``task_name``, ``template``,
  ``template_sha256`` and, with an image store, ``image_path``: the stage-2 reward's fallback when verl does not hand
  it the raw image).

The template is replan's wording of the official prompt unless ``template:`` / ``--prompt_template`` names a file
(e.g. the official ``replan.txt`` from ``python -m replan.templates fetch``).

    python -m replan.train.data --dataset TainU/IV-Edit --split train --out data/train.parquet --format verl
    python -m replan.train.data --dataset tiny --split test --out data/tiny_hf --format hf
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from replan.images import to_rgb
from replan.planner.base import build_prompt, describe_template, load_template

logger = logging.getLogger("replan.train.data")

DATA_SOURCE = "replan_edit"
TASKS = {1: "text_refinement_edit", 2: "edit_region_planning"}  # the official task names (spec §5.3)
REWARD_STYLE = {1: "rule", 2: "model"}
IMAGE_PLACEHOLDER = "<image>"  # verl splits the user text at this marker and puts the image there


@dataclass
class DataConfig:
    """Where the rows come from and which columns hold what (the IV-Edit card's names by default)."""

    dataset: str = "TainU/IV-Edit"  # hub id, local copy (HF layout / save_to_disk), data file, or "tiny"
    split: str = "train"
    image_column: str = "image"
    instruction_column: str = "prompt"
    extra_info_column: str | None = "extra_info"  # JSON string or dict; None: no referring expressions
    answer_column: str | None = "answer"  # verl's ground_truth (unused by the rewards); None or absent: ""
    template: str | None = None  # planner prompt template file; None: replan's (the inference default)
    limit: int | None = None

    def columns(self) -> dict[str, str]:
        """The configured columns that must exist (the answer column is optional)."""
        named = {"image_column": self.image_column, "instruction_column": self.instruction_column,
                 "extra_info_column": self.extra_info_column}
        return {k: v for k, v in named.items() if v}


@dataclass
class Record:
    index: int
    image: Image.Image
    image_bytes: bytes | None  # the dataset's own encoded bytes when it stores them (kept as is for verl)
    instruction: str  # the user instruction: goes into the prompt
    editing_instruction: str  # what the edit server gets (extra_info.instruction_details, else the instruction)
    referring_expression: str
    image_id: str
    answer: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# ---------------------------------------------------------------------------------------------------- reading
def open_split(cfg: DataConfig):
    """The split as a ``datasets.Dataset``, after checking that every configured column exists (one-line
    ``ValueError`` otherwise, before any row is read)."""
    from replan.eval.dataset import open_dataset

    ds = open_dataset(cfg.dataset, cfg.split)
    check_columns(ds.column_names, cfg)
    return ds


def check_columns(columns, cfg: DataConfig) -> None:
    missing = [f"{key}={name!r}" for key, name in cfg.columns().items() if name not in columns]
    if missing:
        raise ValueError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) has no column {', '.join(missing)}; "
                         f"its columns are: {', '.join(columns)}")


def _extra(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            logger.warning("extra_info is not valid JSON; ignored: %.80s", value)
            return {}
    return value if isinstance(value, dict) else {}


def _image(value, index: int) -> tuple[Image.Image, bytes | None]:
    if isinstance(value, Image.Image):
        return to_rgb(value), None
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = value.get("bytes")
        if data is None:
            data = Path(value["path"]).read_bytes()
        return to_rgb(Image.open(io.BytesIO(data))), bytes(data)
    if isinstance(value, str) and Path(value).is_file():
        data = Path(value).read_bytes()
        return to_rgb(Image.open(io.BytesIO(data))), data
    raise ValueError(f"row {index}: the image column holds no image (got {type(value).__name__})")


def iter_records(cfg: DataConfig, ds=None) -> Iterator[Record]:
    """The split's usable rows (``status == "filtered"`` rows are skipped, as in evaluation), up to ``limit``."""
    import datasets

    ds = open_split(cfg) if ds is None else ds
    feature = ds.features.get(cfg.image_column)
    if isinstance(feature, datasets.Image) and feature.decode:  # read the stored bytes: verl keeps them as is
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    n = 0
    for i, row in enumerate(ds):
        if row.get("status") == "filtered":
            continue
        instruction = row.get(cfg.instruction_column)
        if not isinstance(instruction, str) or not instruction.strip():
            logger.warning("row %d has no instruction; skipped", i)
            continue
        extra = _extra(row.get(cfg.extra_info_column)) if cfg.extra_info_column else {}
        details = extra.get("instruction_details") if isinstance(extra.get("instruction_details"), dict) else {}
        image, data = _image(row[cfg.image_column], i)
        answer = row.get(cfg.answer_column) if cfg.answer_column else None
        yield Record(
            index=i, image=image, image_bytes=data, instruction=instruction.strip(),
            editing_instruction=str(details.get("editing_instruction") or instruction).strip(),
            referring_expression=str(extra.get("referring_expression") or details.get("referring_expression") or ""),
            image_id=str(extra.get("image_id", row.get("image_id", i))),
            answer=answer if isinstance(answer, str) else "",
        )
        n += 1
        if cfg.limit is not None and n >= cfg.limit:
            break


def prompt_text(cfg: DataConfig, instruction: str, template: str | None = None) -> str:
    return build_prompt(template if template is not None else load_template(cfg.template), instruction)


# ---------------------------------------------------------------------------------------------------- TRL
def template_record(cfg: DataConfig) -> tuple[str, dict]:
    """The template text and ``{"template": name, "template_sha256": hash}`` recorded in every row."""
    template = load_template(cfg.template)
    info = describe_template(template, cfg.template)
    return template, {"template": info["name"], "template_sha256": info["sha256"]}


def trl_rows(cfg: DataConfig, records=None) -> list[dict]:
    template, recorded = template_record(cfg)
    rows = []
    for r in records if records is not None else iter_records(cfg):
        rows.append({
            "prompt": [{"role": "user", "content": build_prompt(template, r.instruction)}],
            "image": r.image,
            "instruction": r.editing_instruction,
            "referring_expression": r.referring_expression,
            "image_id": r.image_id,
            "width": r.size[0],
            "height": r.size[1],
            **recorded,
        })
    return rows


def to_trl_dataset(cfg: DataConfig, records=None):
    """A ``datasets.Dataset`` for ``trl.GRPOTrainer`` (columns: prompt, image, instruction, referring_expression,
    image_id, width, height, template, template_sha256)."""
    import datasets

    rows = trl_rows(cfg, records)
    if not rows:
        raise ValueError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) has no usable rows")
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "image": datasets.Image(),
        "instruction": datasets.Value("string"),
        "referring_expression": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "template": datasets.Value("string"),
        "template_sha256": datasets.Value("string"),
    })
    return datasets.Dataset.from_list(rows, features=features)


# ---------------------------------------------------------------------------------------------------- verl
def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def verl_rows(cfg: DataConfig, stage: int = 1, image_store: str | Path | None = None, records=None) -> list[dict]:
    """verl ``RLHFDataset`` rows (grpo-feasibility §3.3). ``image_store``: also write each raw image there as
    ``<image_id>.png`` and record its absolute path in ``extra_info.image_path``."""
    if stage not in TASKS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    template, recorded = template_record(cfg)
    store = Path(image_store).resolve() if image_store else None
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in records if records is not None else iter_records(cfg):
        data = r.image_bytes if r.image_bytes is not None else _png(r.image)
        extra = {"index": r.index, "split": cfg.split, "instruction": r.editing_instruction,
                 "referring_expression": r.referring_expression, "image_id": r.image_id,
                 "width": r.size[0], "height": r.size[1], "task_name": TASKS[stage], "image_path": "", **recorded}
        if store is not None:
            path = store / f"{_safe(r.image_id)}.png"
            r.image.save(path)
            extra["image_path"] = str(path)
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": IMAGE_PLACEHOLDER + build_prompt(template, r.instruction)}],
            "images": [{"bytes": data}],
            "ability": "image_editing",
            "reward_model": {"style": REWARD_STYLE[stage], "ground_truth": r.answer},
            "extra_info": extra,
        })
    return rows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "image"


def write_verl_parquet(cfg: DataConfig, out: str | Path, stage: int = 1, image_store: str | Path | None = None) -> int:
    import datasets

    rows = verl_rows(cfg, stage, image_store)
    if not rows:
        raise ValueError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) has no usable rows")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(out))
    return len(rows)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replan.train.data", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=DataConfig.dataset, help="hub id, local copy, data file, or 'tiny'")
    ap.add_argument("--split", default=DataConfig.split)
    ap.add_argument("--out", required=True, help="verl: a .parquet file; hf: a save_to_disk directory")
    ap.add_argument("--format", choices=("verl", "hf"), default="verl")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1,
                    help="verl: reward_model.style rule (1) / model (2)")
    ap.add_argument("--image-store", default=None,
                    help="verl: also save raw images here and record extra_info.image_path (default: <out>.images "
                         "for --stage 2, none for --stage 1; 'none' disables)")
    ap.add_argument("--image-column", default=DataConfig.image_column)
    ap.add_argument("--instruction-column", default=DataConfig.instruction_column)
    ap.add_argument("--extra-info-column", default=DataConfig.extra_info_column, help="'none' if absent")
    ap.add_argument("--answer-column", default=DataConfig.answer_column)
    ap.add_argument("--prompt_template", "--template", dest="template", default=None,
                    help="planner prompt template file, e.g. the official one from 'python -m replan.templates fetch' "
                    "(default: replan's wording of it)")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    none = lambda v: None if v in (None, "", "none", "null") else v  # noqa: E731
    cfg = DataConfig(dataset=args.dataset, split=args.split, image_column=args.image_column,
                     instruction_column=args.instruction_column, extra_info_column=none(args.extra_info_column),
                     answer_column=none(args.answer_column), template=args.template, limit=args.limit)
    try:
        if args.template:
            load_template(args.template)  # fail before reading the dataset
        if args.format == "hf":
            ds = to_trl_dataset(cfg)
            ds.save_to_disk(args.out)
            n = len(ds)
        else:
            store = args.image_store
            if store is None:
                store = str(Path(args.out).with_suffix("")) + ".images" if args.stage == 2 else None
            n = write_verl_parquet(cfg, args.out, args.stage, none(store))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {args.out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
