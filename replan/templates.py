"""The official RePlan prompt files, pinned by commit and SHA-256: names, hashes, download, identification.

    python -m replan.templates list                              # the pinned files, their URLs and hashes
    python -m replan.templates fetch --dest templates/official   # download them; keep only exact matches
    python -m replan.templates check my_prompt.txt               # which template is this file?

replan ships its own wording of every prompt (the planner prompt, the four judge rubrics, the rephrase prompt). The
released planner was trained on the official text, and IV-Edit numbers depend on the exact rubric wording, so
``fetch`` downloads the official files from ``github.com/dvlab-research/RePlan`` at ``OFFICIAL_COMMIT`` and writes a
file only when its SHA-256 equals the hash pinned here; the text itself is never stored in replan. Use them with
``--prompt_template <dest>/replan.txt`` (planner) and ``--prompts_dir <dest>`` (judge rubrics).

Every output that depends on a template records ``describe(text)``: ``{"name", "sha256"}``, where the name says
whether the text is an official file (``official:replan.txt@bc51afc``), replan's own (``replan:…``), or another file.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from replan.io import write_file

OFFICIAL_REPO = "dvlab-research/RePlan"  # the code release (GitHub issues now live at JIA-Lab-research/RePlan)
OFFICIAL_COMMIT = "bc51afc68b26175849c16dfcd78ac3b5b633abc0"  # HEAD of the release, 2025-12-26
RAW_BASE = "https://raw.githubusercontent.com"
MAX_BYTES = 1 << 20  # no prompt file is anywhere near this
DEFAULT_DEST = "templates/official"


@dataclass(frozen=True)
class OfficialFile:
    """One pinned file: the name it is saved under, its path in the official repository, its SHA-256 and its use."""

    name: str
    path: str
    sha256: str
    use: str

    def url(self, base: str = RAW_BASE, repo: str = OFFICIAL_REPO, commit: str = OFFICIAL_COMMIT) -> str:
        return f"{base.rstrip('/')}/{repo}/{commit}/{self.path}"


# The training judge's rubrics (replan/train/reward_function/prompt_templates/) are byte-identical to the eval ones.
OFFICIAL_FILES: tuple[OfficialFile, ...] = (
    OfficialFile("replan.txt", "replan/pipelines/prompt_template/replan.txt",
                 "43782fd8fc4668b027bda9b2c7fd90ba365d1eb91b125590662426e57fd09af6",
                 "planner prompt (--prompt_template)"),
    OfficialFile("replan.jinja", "replan/train/format_prompt/replan.jinja",
                 "d01d897e9b5c5af105e6b51168a6ea4361c5f9ea6b66f255740aeb1778728206",
                 "training twin of replan.txt (jinja, for reference; replan builds the same text)"),
    OfficialFile("rephrase.txt", "replan/pipelines/prompt_template/rephrase.txt",
                 "4fb220eb8e4a4a69e2cf71f1703f09d01fcc0f348c67c027e5928ff322c8f0f1",
                 "rephrase baseline (rephrase_template: in an eval config)"),
    OfficialFile("quality.txt", "replan/eval/prompt_templates/quality.txt",
                 "90cfd2aeb031863fb7b250942b49eef9ecfb53c6714de308e88f7d6e15472adc",
                 "judge rubric (--prompts_dir)"),
    OfficialFile("target_following.txt", "replan/eval/prompt_templates/target_following.txt",
                 "0fe1572b78ff4ea7c2595ea89ec49a10aa20d79c2c5d0a9a6c8b3cb17f4c546e",
                 "judge rubric (--prompts_dir; also the training judge)"),
    OfficialFile("effect.txt", "replan/eval/prompt_templates/effect.txt",
                 "00f163dbdb84489de5dd50dd0ecc56c0b7b4d151bda4b16bea8e5709dbbd9406",
                 "judge rubric (--prompts_dir; also the training judge)"),
    OfficialFile("consistency.txt", "replan/eval/prompt_templates/consistency.txt",
                 "88bd25082b30e134a2b47bef8a1317b0c5b83a334aaabb910e8ecebf371d99bb",
                 "judge rubric (--prompts_dir; also the training judge)"),
)
BY_NAME = {f.name: f for f in OFFICIAL_FILES}
BY_HASH = {f.sha256: f for f in OFFICIAL_FILES}


class TemplateFetchError(RuntimeError):
    """A file could not be downloaded, or what was downloaded is not the pinned file."""


# ---------------------------------------------------------------------------------------------------- identity
def sha256_text(text: str) -> str:
    """SHA-256 of the text's UTF-8 bytes (what a file read with ``encoding="utf-8"`` hashes to on disk)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def official_name(text: str) -> str | None:
    """``official:<file>@<commit7>`` when ``text`` is exactly a pinned official file, else None."""
    found = BY_HASH.get(sha256_text(text))
    return None if found is None else f"official:{found.name}@{OFFICIAL_COMMIT[:7]}"


def describe(text: str, source: str | None = None) -> dict:
    """``{"name", "sha256"}`` for a template: the official name when the text is a pinned file, else ``source``
    (replan's own files pass ``replan:<file>``; a user file its path), else ``custom``."""
    return {"name": official_name(text) or source or "custom", "sha256": sha256_text(text)}


# ---------------------------------------------------------------------------------------------------- download
def _download(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "replan-templates"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise TemplateFetchError(f"{url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TemplateFetchError(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None
    if len(data) > MAX_BYTES:
        raise TemplateFetchError(f"{url} sent more than {MAX_BYTES} bytes; not a prompt file")
    return data


def fetch_one(file: OfficialFile, dest: str | Path, base: str = RAW_BASE, timeout: float = 30.0) -> Path:
    """Download one pinned file into ``dest`` and return its path; ``TemplateFetchError`` (nothing written) when the
    download fails or its SHA-256 is not the pinned one."""
    url = file.url(base)
    data = _download(url, timeout)
    got = hashlib.sha256(data).hexdigest()
    if got != file.sha256:
        raise TemplateFetchError(
            f"{file.name}: the file at {url} has SHA-256 {got}, not the pinned {file.sha256}; nothing was written. "
            f"Download it by hand from github.com/{OFFICIAL_REPO} at commit {OFFICIAL_COMMIT[:7]}, check it, and "
            f"pass its path yourself (outputs will record it by its hash), or keep replan's own wording")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return write_file(dest / file.name, lambda p: p.write_bytes(data))


def fetch(dest: str | Path = DEFAULT_DEST, names=None, base: str = RAW_BASE, timeout: float = 30.0,
          files: tuple[OfficialFile, ...] = OFFICIAL_FILES) -> tuple[list[Path], list[str]]:
    """Fetch ``names`` (default: every file in ``files``); ``(written paths, error lines)``. A file already in
    ``dest`` with the pinned hash is kept without downloading it again."""
    table = {f.name: f for f in files}
    unknown = [n for n in names or () if n not in table]
    if unknown:
        raise ValueError(f"unknown template(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    written, errors = [], []
    for name in names or list(table):
        file, path = table[name], Path(dest) / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == file.sha256:
            written.append(path)
            continue
        try:
            written.append(fetch_one(file, dest, base, timeout))
        except TemplateFetchError as e:
            errors.append(str(e))
    return written, errors


def check_file(path: str | Path) -> str:
    """One line saying what ``path`` is: a pinned official file, replan's own, or unknown (with its hash)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    found = BY_HASH.get(digest)
    if found is not None:
        return f"{path}: official {found.name} at {OFFICIAL_COMMIT[:7]} (sha256 {digest[:16]}…)"
    return f"{path}: not a pinned official file (sha256 {digest})"


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replan.templates", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the pinned official files, their URLs and SHA-256")
    f = sub.add_parser("fetch", help="download the official files; keep only those whose SHA-256 matches")
    f.add_argument("--dest", default=DEFAULT_DEST, help=f"folder to write to (default {DEFAULT_DEST})")
    f.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(BY_NAME)}")
    f.add_argument("--base_url", default=RAW_BASE, help=f"raw-file host (default {RAW_BASE}; a mirror with the "
                   "same <repo>/<commit>/<path> layout works)")
    f.add_argument("--timeout", type=float, default=30.0, help="seconds per download")
    c = sub.add_parser("check", help="say which template each file is")
    c.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "list":
        print(f"github.com/{OFFICIAL_REPO} at {OFFICIAL_COMMIT}")
        for file in OFFICIAL_FILES:
            print(f"{file.name:<22} {file.sha256}  {file.use}\n{'':<22} {file.url()}")
        return 0
    if args.command == "check":
        try:
            for path in args.files:
                print(check_file(path))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        written, errors = fetch(args.dest, args.only, args.base_url, args.timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"ok {path}")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if written:
        dest = Path(args.dest)
        print(f"use: --prompt_template {dest / 'replan.txt'} (planner), --prompts_dir {dest} (judge rubrics)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
