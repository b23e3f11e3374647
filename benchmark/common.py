"""Shared benchmark plumbing: the machine and versions, median timing, and where results are written.

Results go to ``outputs/benchmarks/<name>-<device>.{json,md}`` (ignored by git), so running a benchmark never
changes a tracked file; ``--save`` writes the tracked copy in ``benchmark/results/`` instead (do that only for a run
worth keeping); ``--out STEM`` writes ``STEM.json`` and ``STEM.md`` anywhere. Both files are written all at once
(``replan.io.write_outputs``): a failed write leaves the previous report whole.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from replan.io import write_outputs

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs" / "benchmarks"
RESULTS = Path(__file__).resolve().parent / "results"


def environment(device) -> dict:
    import diffusers
    import transformers

    device = torch.device(device)
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
           "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def once(fn, device) -> float:
    """Wall time of one call of ``fn()`` in seconds (e.g. a first call that compiles)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(str(r.get(k, "–")) for k in keys) + " |" for r in rows]


def to_markdown(title: str, report: dict, sections: dict[str, list[dict]], notes: list[str] = ()) -> str:
    lines = [f"# {title} ({report['env']['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()] + [""]
    lines += [*notes, ""] if notes else []
    for name, rows in sections.items():
        if rows:
            lines += [f"## {name}", "", *table(rows), ""]
    return "\n".join(lines)


def write(name: str, device, report: dict, markdown: str, save: bool = False, out: str | None = None) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md``: ``out`` if given, else ``outputs/benchmarks/<name>-<device type>``
    (``benchmark/results/`` with ``save``)."""
    stem = Path(out) if out else (RESULTS if save else OUTPUTS) / f"{name}-{torch.device(device).type}"
    return write_stem(stem, report, markdown)


def write_report(name: str, args, report: dict, markdown: str) -> Path:
    """Like ``write`` for a ``name`` that already carries its device suffix, with ``--save``/``--out`` read from
    ``args`` (see ``add_output_flags``)."""
    out, save = getattr(args, "out", None), getattr(args, "save", False)
    return write_stem(Path(out) if out else (RESULTS if save else OUTPUTS) / name, report, markdown)


def write_stem(stem: Path, report: dict, markdown: str) -> Path:
    json_text = json.dumps(report, indent=2, default=str) + "\n"
    md_text = markdown.rstrip() + "\n"
    write_outputs(stem.parent, {
        stem.name + ".json": lambda p: p.write_text(json_text, encoding="utf-8"),
        stem.name + ".md": lambda p: p.write_text(md_text, encoding="utf-8"),
    })
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    return stem


def add_output_flags(ap) -> None:
    ap.add_argument("--save", action="store_true", help="write the tracked copy in benchmark/results/ (default: "
                    "outputs/benchmarks/)")
    ap.add_argument("--out", default=None, help="output stem: STEM.json and STEM.md (overrides --save)")
