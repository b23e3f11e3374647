"""Writing results so that nothing is half-written and nothing computed is lost.

    write_outputs(out_dir, {"result.png": lambda p: image.save(p), "plan.json": lambda p: plan.save(p)})

Each value is a writer: a function that writes one file at the path it is handed. ``write_outputs`` runs every
writer into a hidden staging folder **inside** ``out_dir`` (so on the same filesystem as the destination, whatever
``out_dir`` is: a symlink to another disk, a mount point, a Docker volume), then renames the files into ``out_dir``
in the order given — put the file whose presence marks a finished job last. Nothing appears in ``out_dir`` unless
every writer succeeded.

Any ``OSError`` while writing (read-only disk, full disk, a file where a folder is expected, no permission) becomes
one ``OutputError`` that names the path; before it is raised the same writers run again into a fallback folder
(``$REPLAN_RESCUE_DIR``, else ``<tmp>/replan-unsaved``, else ``./replan-unsaved``) and the error names that folder,
so the computed result survives. ``check_writable`` finds an unwritable destination before any work starts.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

STAGING_PREFIX = ".replan-staging-"
Writer = Callable[[Path], object]


class OutputError(OSError):
    """Results could not be written to ``path``; ``saved_to`` is where they were saved instead (None: nowhere)."""

    def __init__(self, path: Path, reason: str, saved_to: Path | None = None, tried: tuple = ()):
        self.path, self.reason, self.saved_to, self.tried = Path(path), reason, saved_to, tuple(tried)
        if saved_to is not None:
            where = f"the result was saved to {saved_to} instead"
        else:
            where = "no fallback folder was writable either (tried " + ", ".join(map(str, tried)) + "): nothing saved"
        super().__init__(f"cannot write {self.path} ({reason}); {where}")

    def __str__(self) -> str:
        return self.args[0]


def describe(error: OSError) -> str:
    """``'Read-only file system'``-style text of an OSError, without the path (messages name the path themselves)."""
    return error.strerror or str(error) or type(error).__name__


def write_outputs(out_dir: str | Path, files: Mapping[str, Writer], *, rescue: bool = True) -> Path:
    """Write ``files`` (name → writer) into ``out_dir`` all or nothing; returns ``out_dir``.

    Raises ``OutputError`` on any filesystem error, after saving the files to a fallback folder (``rescue=False``:
    do not).
    """
    out_dir = Path(out_dir)
    try:
        _write_into(out_dir, files)
    except OSError as e:
        path = Path(e.filename) if getattr(e, "filename", None) else out_dir
        if STAGING_PREFIX in str(path):  # name the destination, not our staging folder
            path = out_dir / Path(path).name if Path(path).name in files else out_dir
        if not rescue:
            raise OutputError(path, describe(e), None, ("rescue disabled",)) from e
        saved, tried = rescue_outputs(out_dir.name or "output", files)
        raise OutputError(path, describe(e), saved, tried) from e
    return out_dir


# kept for callers written before replan.io existed
write_atomically = write_outputs


def _write_into(out_dir: Path, files: Mapping[str, Writer]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        for name, write in files.items():
            write(stage / name)
        for name in files:
            move_file(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_file(path: str | Path, write: Writer) -> Path:
    """Write one file atomically: staged next to its real location (symlinks resolved), then renamed over it."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        move_file(Path(tmp), target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``write_file`` for text (UTF-8)."""
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def move_file(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; across filesystems, copy next to ``dst`` first and rename that (still atomic)."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)
        src.unlink(missing_ok=True)


def rescue_dirs() -> list[Path]:
    """Fallback folders, in the order they are tried."""
    dirs = [Path(os.environ["REPLAN_RESCUE_DIR"])] if os.environ.get("REPLAN_RESCUE_DIR") else []
    return dirs + [Path(tempfile.gettempdir()) / "replan-unsaved", Path.cwd() / "replan-unsaved"]


def rescue_outputs(name: str, files: Mapping[str, Writer]) -> tuple[Path | None, tuple[Path, ...]]:
    """Run ``files``' writers into a new folder under the first writable fallback; (that folder or None, tried)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tried = []
    for root in rescue_dirs():
        tried.append(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix=f"{name}-{stamp}-", dir=root))
            _write_into(target, files)
            return target, tuple(tried)
        except OSError:
            continue
    return None, tuple(tried)


def clean_staging(out_dir: str | Path) -> None:
    """Remove staging folders a killed run left inside ``out_dir`` (call only where no other writer is active)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for stale in out_dir.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)


def check_writable(out_dir: str | Path, what: str = "output directory") -> None:
    """``ValueError`` with the fix when ``out_dir`` cannot be created or written; creates nothing that stays.

    Probes by really creating (and removing) a file in ``out_dir`` or in its nearest existing parent, so read-only
    mounts, immutable folders and missing permissions are all caught — for root too.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise ValueError(f"{what} {out_dir} is a symlink to {os.readlink(out_dir)}, which does not exist: "
                         "create the target or choose another directory")
    probe_dir = out_dir
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ValueError(f"{what} {out_dir} cannot be created: {probe_dir} is a file, not a directory; "
                         "choose another directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".replan-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {out_dir} is not writable ({describe(e)} in {probe_dir}); "
                         "choose a writable directory") from None
