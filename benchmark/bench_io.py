"""Where benchmark scripts write their reports.

By default ``outputs/benchmarks/<name>.{json,md}`` (ignored by git), so running a benchmark never changes a tracked
file; with ``--save`` the report goes to ``benchmark/results/<name>.{json,md}`` instead, the tracked numbers the docs
quote. ``--out STEM`` writes ``STEM.json`` and ``STEM.md`` anywhere. Files are written all at once (``replan.io``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from replan.io import write_outputs

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs" / "benchmarks"
SAVED = Path(__file__).resolve().parent / "results"


def add_output_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--save", action="store_true",
                    help="write to benchmark/results/ (tracked, quoted by the docs) instead of outputs/benchmarks/")
    ap.add_argument("--out", default=None, help="output stem: STEM.json and STEM.md (overrides --save)")


def report_stem(name: str, args: argparse.Namespace) -> Path:
    """``--out`` if given, else ``benchmark/results/<name>`` with ``--save``, else ``outputs/benchmarks/<name>``."""
    if getattr(args, "out", None):
        return Path(args.out)
    return (SAVED if getattr(args, "save", False) else OUTPUTS) / name


def write_report(name: str, args: argparse.Namespace, report: dict, markdown: str) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md``; returns the stem and prints where they went."""
    stem = report_stem(name, args)
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    write_outputs(stem.parent, {
        stem.name + ".json": lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"),
        stem.name + ".md": lambda p: p.write_text(text, encoding="utf-8"),
    })
    print(f"wrote {stem}.json and {stem}.md")
    return stem
