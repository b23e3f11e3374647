"""replan.io: outputs staged inside the destination (symlinks and mounts work), every OSError one OutputError that
names the path, and the computed result saved to a fallback folder instead of lost.

Tests run as root here, and root ignores permission bits. Read-only destinations are therefore made in ways that
refuse root too: an immutable folder (``chattr +i``, where the filesystem and capabilities allow it), sysfs (root
may not create files there), and, everywhere, a regular file where a folder is expected (ENOTDIR). As a normal user
a ``chmod 555`` folder is used as well.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from replan import io
from replan.io import OutputError, check_writable, move_file, write_outputs

SHM = Path("/dev/shm")


def writers(text="hello"):
    return {"a.txt": lambda p: p.write_text(text), "b.txt": lambda p: p.write_text(text.upper())}


@pytest.fixture
def rescue(tmp_path, monkeypatch):
    folder = tmp_path / "rescue"
    monkeypatch.setenv("REPLAN_RESCUE_DIR", str(folder))
    return folder


@pytest.fixture
def other_fs(tmp_path):
    """A folder on another filesystem than tmp_path (``/dev/shm``), or skip."""
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    folder = Path(os.path.realpath(SHM)) / f"replan-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _immutable(folder: Path):
    chattr = shutil.which("chattr")
    if not chattr or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        return None
    return lambda: subprocess.run([chattr, "-i", str(folder)], capture_output=True)


@pytest.fixture(params=["immutable-or-chmod", "sysfs"])
def read_only_dir(request, tmp_path):
    """An existing folder in which nobody, root included, can create a file (skipped where none can be made)."""
    if request.param == "sysfs":
        folder, undo = Path("/sys/kernel"), None
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        if os.geteuid() != 0:
            folder.chmod(0o555)
            undo = lambda: folder.chmod(0o755)  # noqa: E731
        else:
            undo = _immutable(folder)
            if undo is None:
                pytest.skip("chattr +i is not permitted here")
    try:
        (folder / ".replan-write-probe").write_text("x")
    except OSError:
        pass
    else:
        (folder / ".replan-write-probe").unlink()
        if undo:
            undo()
        pytest.skip(f"{folder} is writable here")
    yield folder
    if undo:
        undo()


def test_files_appear_together_and_staging_is_removed(tmp_path):
    out = tmp_path / "deep" / "out"
    assert write_outputs(out, writers()) == out
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    assert (out / "b.txt").read_text() == "HELLO"


def test_a_failing_writer_leaves_nothing_behind(tmp_path, rescue):
    out = tmp_path / "out"

    def broken(path):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # not a filesystem error: raised as is
        write_outputs(out, {"a.txt": lambda p: p.write_text("x"), "b.txt": broken})
    assert list(out.iterdir()) == []


def test_output_dir_symlinked_to_another_filesystem(tmp_path, other_fs):
    link = tmp_path / "out"
    link.symlink_to(other_fs)  # a Docker volume or a symlink to another disk
    write_outputs(link, writers())
    write_outputs(link / "sample", writers("again"))
    assert (other_fs / "a.txt").read_text() == "hello" and (other_fs / "sample" / "b.txt").read_text() == "AGAIN"
    assert not [p for p in other_fs.rglob("*") if p.name.startswith(io.STAGING_PREFIX)]


def test_move_file_copies_then_renames_across_filesystems(tmp_path, other_fs):
    src = other_fs / "result.png"
    src.write_bytes(b"\x89PNG data")
    dst = tmp_path / "result.png"
    dst.write_bytes(b"old")
    move_file(src, dst)
    assert dst.read_bytes() == b"\x89PNG data" and not src.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]  # no temporary copy left


def test_read_only_directory_is_one_error_and_the_result_is_rescued(read_only_dir, rescue):
    out = read_only_dir / "run"
    with pytest.raises(OutputError) as info:
        write_outputs(out, writers())
    e = info.value
    assert str(out) in str(e) and "saved to" in str(e) and "\n" not in str(e)
    assert e.saved_to is not None and e.saved_to.parent == rescue and str(e.saved_to) in str(e)
    assert (e.saved_to / "a.txt").read_text() == "hello" and (e.saved_to / "b.txt").read_text() == "HELLO"
    with pytest.raises(ValueError, match="not writable"):
        check_writable(out)
    with pytest.raises(ValueError, match="not writable"):
        check_writable(read_only_dir)


def test_file_where_a_directory_is_expected(tmp_path, rescue):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(OutputError) as info:
        write_outputs(out, writers())
    assert "results.txt" in str(info.value) and (info.value.saved_to / "a.txt").is_file()
    assert isinstance(info.value, OSError)
    with pytest.raises(ValueError, match="results.txt is a file, not a directory"):
        check_writable(out / "deeper")


def test_nothing_writable_anywhere_says_so(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(io, "rescue_dirs", lambda: [blocker / "a", blocker / "b"])
    with pytest.raises(OutputError, match="no fallback folder was writable either") as info:
        write_outputs(blocker / "out", writers())
    assert info.value.saved_to is None


def test_check_writable_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    check_writable(target)
    assert list(tmp_path.iterdir()) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        check_writable(dangling)


def test_write_file_writes_through_a_symlinked_file(tmp_path, other_fs):
    real = other_fs / "scores.json"
    real.write_text("{}")
    link = tmp_path / "scores.json"
    link.symlink_to(real)
    io.write_text(link, '{"a": 1}')
    assert link.is_symlink() and real.read_text() == '{"a": 1}'
