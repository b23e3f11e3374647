"""Checkpoints of a learnable-regions run, written so that a kill at any moment loses nothing already saved.

``<output_dir>/checkpoints/step-N/`` holds the head and its config (``RegionGenerator.load`` reads it), ``trainer.pt``
(optimizer, scheduler, step, epoch, number of processes, config) and one ``rank-<r>.pt`` per process (its RNG states,
data position, skip counts and running baseline: what that process needs to continue bit for bit). Everything is
written into ``.step-N.tmp`` first and renamed when all processes are done, so a checkpoint is complete or absent.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

TRAINER_FILE = "trainer.pt"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in (Path(out) / "checkpoints").glob("step-*")
             if p.name.split("-", 1)[1].isdigit() and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def clean_partial(out: Path) -> None:
    """Remove the ``.step-N.tmp`` folders a killed run left behind."""
    for tmp in (Path(out) / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def save(acc, out: Path, step: int, model, trainer_state: dict, rank_state: dict, keep: int) -> Path:
    """Every process calls this: the main one writes the head and ``trainer.pt``, each one its ``rank-<r>.pt``."""
    root = Path(out) / "checkpoints"
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save(tmp)
        torch.save(trainer_state, tmp / TRAINER_FILE)
    acc.wait_for_everyone()
    torch.save(rank_state, tmp / rank_file(acc.process_index))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(path: Path, rank: int, world: int) -> tuple[dict, dict]:
    """(``trainer.pt``, this process's ``rank-<r>.pt``); one-line ``ValueError`` when they cannot be continued."""
    path = Path(path)
    if not (path / TRAINER_FILE).is_file():
        raise ValueError(f"resume={path}: not a learnable-regions checkpoint (no {TRAINER_FILE}); use resume=auto "
                         f"or a <output_dir>/checkpoints/step-N folder")
    state = torch.load(path / TRAINER_FILE, weights_only=False)
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise ValueError(f"{path} was written by {saved_world} process(es) and this run has {world}: resume with "
                         f"the same number (accelerate launch --num_processes {saved_world}) so every data position "
                         f"continues where it stopped")
    own = path / rank_file(rank)
    if not own.is_file():
        raise ValueError(f"{path} has no {own.name}: the checkpoint is incomplete; pick an older one (resume=<dir>)")
    return state, torch.load(own, weights_only=False)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric rows a killed run logged after the checkpoint it is resumed from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
