"""Emu Edit and MagicBrush test sets as records (spec §10).

    records = load_emu("facebook/emu_edit_test_set", "test")     # hub id, or a local copy with the same columns
    turns = load_magicbrush("/data/magicbrush/test")              # the released test folder (edit_sessions.json)
    turns = load_magicbrush("osunlp/MagicBrush", "dev")           # or the hub columns (train/dev only on the hub)

Emu Edit (``facebook/emu_edit_test_set``: ``instruction, image, task, split, idx, hash, input_caption,
output_caption``; splits ``validation`` and ``test`` — the paper does not say which it used, the default is
``test``): one ``EditRecord`` per row, id = ``idx``.

MagicBrush: one ``EditRecord`` per turn, id ``<session>_<turn>`` (turns numbered from 1, as the official
``-output<t>.png`` files): ``source`` is the ground-truth input of that turn (the session input for turn 1, the GT
output of turn t−1 after), ``target`` the GT output, ``session``/``turn``/``num_turns`` the multi-turn structure.
Accepted copies: the released test folder (``edit_sessions.json`` + ``images/<session>/``), or anything with the
``osunlp/MagicBrush`` columns (``img_id, turn_index, source_img, mask_img, instruction, target_img``): a hub id, a
``save_to_disk`` directory, a directory in hub layout or a parquet/json file. The MagicBrush test split is not on the
hub (``osunlp/MagicBrush`` holds train/dev); pass a local copy.

``"tiny"`` as the source builds the offline fixture (``replan.testing.vision``) once into ``$REPLAN_CACHE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from replan.eval.dataset import open_dataset
from replan.images import to_rgb

EMU_DATASET, EMU_SPLIT = "facebook/emu_edit_test_set", "test"
MAGICBRUSH_SPLIT = "test"
TINY = "tiny"


@dataclass
class EditRecord:
    id: str
    source: Image.Image
    instruction: str
    input_caption: str = ""
    output_caption: str = ""
    target: Image.Image | None = None  # MagicBrush: the ground-truth output of this turn
    task: str = ""  # Emu Edit category
    session: str = ""  # MagicBrush session id
    turn: int = 1  # 1-based turn index within the session
    num_turns: int = 1
    extra: dict = field(default_factory=dict)


def resolve(source: str, builder: str, name: str) -> str:
    if source != TINY:
        return source
    from replan.backbones.registry import build_offline

    return str(build_offline(builder, name))


def _image(value, what: str) -> Image.Image:
    if not isinstance(value, Image.Image):
        raise ValueError(f"{what} is not an image (got {type(value).__name__})")
    return to_rgb(value)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


# ---------------------------------------------------------------------------------------------------- Emu Edit
def load_emu(source: str = EMU_DATASET, split: str = EMU_SPLIT, limit: int | None = None) -> list[EditRecord]:
    source = resolve(source, "replan.testing.vision:save_tiny_emu", "tiny-emu-edit")
    records = []
    for i, row in enumerate(open_dataset(source, split)):
        for column in ("image", "instruction"):
            if column not in row:
                raise ValueError(f"Emu Edit row {i} has no '{column}' column")
        rid = row.get("idx", i)
        records.append(EditRecord(
            id=str(rid), source=_image(row["image"], f"Emu Edit row {i} 'image'"),
            instruction=_text(row["instruction"]), input_caption=_text(row.get("input_caption")),
            output_caption=_text(row.get("output_caption")), task=_text(row.get("task")),
            extra={k: row[k] for k in ("hash", "split") if k in row}))
        if limit is not None and len(records) >= limit:
            break
    _check_unique(records, source)
    return records


# ---------------------------------------------------------------------------------------------------- MagicBrush
def load_magicbrush(source: str, split: str = MAGICBRUSH_SPLIT, limit: int | None = None) -> list[EditRecord]:
    """All turns of all sessions (``limit`` counts sessions), sorted by session then turn."""
    source = resolve(source, "replan.testing.vision:save_tiny_magicbrush", "tiny-magicbrush")
    path = Path(source)
    folder = path if (path / "edit_sessions.json").is_file() else path / split
    if (folder / "edit_sessions.json").is_file():
        records = _magicbrush_folder(folder)
    else:
        records = _magicbrush_table(open_dataset(source, split))
    sessions: dict[str, list[EditRecord]] = {}
    for r in records:
        sessions.setdefault(r.session, []).append(r)
    out = []
    for sid in list(sessions)[:limit] if limit is not None else sessions:
        turns = sorted(sessions[sid], key=lambda r: r.turn)
        if [r.turn for r in turns] != list(range(1, len(turns) + 1)):
            raise ValueError(f"MagicBrush session {sid} has turns {[r.turn for r in turns]}, expected 1..{len(turns)}")
        for r in turns:
            r.num_turns = len(turns)
        out += turns
    _check_unique(out, source)
    return out


def _magicbrush_folder(folder: Path) -> list[EditRecord]:
    meta = json.loads((folder / "edit_sessions.json").read_text(encoding="utf-8"))
    records = []
    for sid, turns in meta.items():
        for t, turn in enumerate(turns, start=1):
            def load(name, sid=sid):
                file = folder / "images" / str(sid) / name
                if not file.is_file():
                    raise ValueError(f"MagicBrush session {sid}: missing {file}")
                with Image.open(file) as im:
                    return im.convert("RGB")

            records.append(EditRecord(id=f"{sid}_{t}", source=load(turn["input"]), target=load(turn["output"]),
                                      instruction=_text(turn.get("instruction")), session=str(sid), turn=t,
                                      extra={"mask": turn.get("mask")}))
    return records


def _magicbrush_table(table) -> list[EditRecord]:
    records = []
    for i, row in enumerate(table):
        for column in ("img_id", "turn_index", "source_img", "instruction", "target_img"):
            if column not in row:
                raise ValueError(f"MagicBrush row {i} has no '{column}' column")
        sid, t = str(row["img_id"]), int(row["turn_index"])
        records.append(EditRecord(id=f"{sid}_{t}", source=_image(row["source_img"], f"MagicBrush row {i} source"),
                                  target=_image(row["target_img"], f"MagicBrush row {i} target"),
                                  instruction=_text(row["instruction"]), session=sid, turn=t))
    return records


def _check_unique(records: list[EditRecord], source: str) -> None:
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {source!r} has duplicate record ids; every record needs its own output folder")
