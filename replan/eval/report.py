"""Tables and charts from judged runs (``replan.eval.evaluate`` JSON) and fidelity runs (``replan.eval.fidelity``).

    python -m replan.eval.report outputs/eval/replan_flux_kontext.json outputs/eval/baseline_flux_kontext.json \\
        --out outputs/eval/report
    python -m replan.eval.report a.json b.json fidelity.json --labels "RePlan (Kontext),Kontext,RePlan vs Kontext" \\
        --out outputs/eval/report

Writes ``<out>/report.md`` with

* a table of the runs: judge, dataset, counts, the score parsing and how many off-scale judge scores it used, and
  the rubrics each run was judged with (name and SHA-256 prefix; ``official:…`` marks the official files);
* the main table in the paper's layout — Method | Quality | Target | Effect | Consistency | Overall | Weighted, two
  decimals, best value per column in bold when there are several runs — from each run's ``aggregate`` (missing or
  failed samples count as zeros, as official), then the same over judged samples only (``judged_only``);
* one breakdown table per category key (e.g. ``referring_type``, ``task_type``) and score (Overall, Weighted);
* a fidelity table (PSNR/SSIM/LPIPS against the reference run, PSNR/SSIM of the background against the input);

and PNG bar charts comparing the runs: ``scores.png``, ``breakdown_<key>.png``, ``fidelity.png``. A run's label is
its ``--labels`` entry (comma-separated, in input order), else the name of its ``results_dir`` (fidelity: ``run``),
else the file's stem. Input files are told apart by content: fidelity files carry ``"metric": "fidelity"``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from replan.io import check_writable, write_atomically

SCORES = ("quality", "target", "effect", "consistency", "overall", "weighted")
HEADERS = ("Quality", "Target", "Effect", "Consistency", "Overall", "Weighted")
BREAKDOWN_SCORES = (("overall", "Overall"), ("weighted", "Weighted"))


@dataclass
class Run:
    label: str
    path: Path
    data: dict

    @property
    def is_fidelity(self) -> bool:
        return self.data.get("metric") == "fidelity"


def load_runs(paths, labels: list[str] | None = None) -> list[Run]:
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels has {len(labels)} entries for {len(paths)} input files")
    runs = []
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"input file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not (data.get("metric") == "fidelity" or isinstance(data.get("aggregate"),
                                                                                              dict)):
            raise ValueError(f"{path} is neither a replan.eval.evaluate nor a replan.eval.fidelity output "
                             "(no 'aggregate' object)")
        if labels is not None:
            label = labels[i]
        else:
            source = data.get("run") if data.get("metric") == "fidelity" else data.get("results_dir")
            label = Path(str(source).rstrip("/")).name if source else path.stem
        runs.append(Run(label, path, data))
    return runs


# ---------------------------------------------------------------------------------------------------- markdown
def _num(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{float(value):.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align_first_left: bool = True) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---" if align_first_left and i == 0 else "---:" for i in range(len(header))]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _bold_best(values: list, digits: int, higher_is_better: bool = True) -> list[str]:
    """Format a column; the best value(s) in bold when more than one run has a value."""
    cells = [_num(v, digits) for v in values]
    present = [round(v, digits) for v in values if v is not None and not math.isnan(v)]
    if len(present) > 1:
        best = max(present) if higher_is_better else min(present)
        cells = [f"**{c}**" if v is not None and round(v, digits) == best else c for c, v in zip(cells, values)]
    return cells


def score_table(runs: list[Run], key: str = "aggregate") -> list[str]:
    columns = [_bold_best([_get(r.data.get(key), s) for r in runs], 2) for s in SCORES]
    rows = [[r.label] + [col[i] for col in columns] for i, r in enumerate(runs)]
    return _table(["Method", *HEADERS], rows)


def _get(mapping, key):
    if not isinstance(mapping, dict):
        return None
    value = mapping.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def breakdown_keys(runs: list[Run]) -> list[str]:
    keys = []
    for r in runs:
        for k in (r.data.get("breakdowns") or {}):
            if k not in keys:
                keys.append(k)
    return keys


def breakdown_values(runs: list[Run], key: str) -> list[tuple[str, int | None]]:
    values: dict[str, int | None] = {}
    for r in runs:
        for value, stats in ((r.data.get("breakdowns") or {}).get(key) or {}).items():
            if value not in values:
                values[value] = stats.get("count") if isinstance(stats, dict) else None
    return sorted(values.items(), key=lambda kv: kv[0])


def breakdown_table(runs: list[Run], key: str, score: str) -> list[str]:
    values = breakdown_values(runs, key)
    per_run = [(r.data.get("breakdowns") or {}).get(key) or {} for r in runs]
    rows = []
    for value, count in values:
        cells = _bold_best([_get(b.get(value), score) for b in per_run], 2)
        rows.append([value, "–" if count is None else str(count), *cells])
    return _table([key, "n", *[r.label for r in runs]], rows)


def rubric_table(runs: list[Run]) -> list[str]:
    """One row per run: each dimension's rubric as ``name (sha256 prefix)``; ``–`` when the run did not record it."""
    dims = ("quality", "target_following", "effect", "consistency")
    rows = []
    for r in runs:
        rubrics = r.data.get("templates") if isinstance(r.data.get("templates"), dict) else {}
        cells = []
        for dim in dims:
            t = rubrics.get(dim) if isinstance(rubrics.get(dim), dict) else {}
            cells.append(f"{t['name']} ({str(t.get('sha256', ''))[:12]})" if t.get("name") else "–")
        rows.append([r.label, *cells])
    return ["Rubrics:", "", *_table(["Method", *dims], rows)]


def fidelity_table(runs: list[Run]) -> list[str]:
    def psnr_cell(agg):
        if not isinstance(agg, dict) or agg.get("count", 0) == 0:
            return "–"
        if agg.get("psnr") is not None and math.isinf(agg["psnr"]):
            finite = agg.get("psnr_finite")
            return "inf" if finite is None else f"{finite:.2f} (+{agg.get('identical', 0)} identical)"
        return _num(agg.get("psnr"), 2)

    rows = []
    for r in runs:
        agg = r.data.get("aggregate") or {}
        ref, orig, bg = agg.get("reference"), agg.get("original"), agg.get("background")
        rows.append([r.label, r.data.get("reference") and Path(str(r.data["reference"]).rstrip("/")).name or "–",
                     psnr_cell(ref), _num(_get(ref, "ssim"), 4), _num(_get(ref, "lpips"), 4),
                     psnr_cell(orig), _num(_get(orig, "ssim"), 4), psnr_cell(bg), _num(_get(bg, "ssim"), 4)])
    return _table(["Run", "Reference", "PSNR ↑", "SSIM ↑", "LPIPS ↓", "Input PSNR", "Input SSIM",
                   "Background PSNR ↑", "Background SSIM ↑"], rows)


def markdown(judged: list[Run], fidelity: list[Run], charts: dict[str, str]) -> str:
    lines = ["# IV-Edit results", ""]
    if judged:
        lines += ["## Scores (all samples; missing or failed samples count as 0, as official)", ""]
        lines += score_table(judged) + [""]
        if any(isinstance(r.data.get("judged_only"), dict) for r in judged):
            lines += ["## Scores over judged samples only", ""] + score_table(judged, "judged_only") + [""]
        lines += ["| Method | Judge | Dataset | Samples | Not fully judged | Without result | Score parse | "
                  "Off-scale used | Results |", "|:---|:---|:---|---:|---:|---:|:---|---:|:---|"]
        for r in judged:
            d = r.data
            dataset = f"{d.get('dataset', '–')}:{d.get('split', '–')}"
            off = d.get("off_scale") if isinstance(d.get("off_scale"), dict) else {}
            lines.append(f"| {r.label} | {d.get('judge_model', '–')} | {dataset} | {len(d.get('samples') or [])} | "
                         f"{d.get('failed', '–')} | {d.get('missing', '–')} | {d.get('score_parse', '–')} | "
                         f"{off.get('used', '–')} | {d.get('results_dir', '–')} |")
        lines.append("")
        lines += rubric_table(judged) + [""]
        if "scores" in charts:
            lines += [f"![scores]({charts['scores']})", ""]
        for key in breakdown_keys(judged):
            lines += [f"## Breakdown by {key}", ""]
            for score, title in BREAKDOWN_SCORES:
                lines += [f"### {title}", ""] + breakdown_table(judged, key, score) + [""]
            if f"breakdown_{key}" in charts:
                lines += [f"![{key}]({charts[f'breakdown_{key}']})", ""]
    if fidelity:
        lines += ["## Fidelity", "",
                  "PSNR/SSIM/LPIPS: the run against its reference run; Input: the result against the input image; "
                  "Background: against the input, outside the plan's boxes only. PSNR in dB (identical samples are "
                  "infinite and counted apart).", ""]
        lines += fidelity_table(fidelity) + [""]
        if "fidelity" in charts:
            lines += [f"![fidelity]({charts['fidelity']})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- charts
def _bars(ax, groups: list[str], series: list[tuple[str, list]], ylabel: str):
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series):
        heights = [0.0 if v is None or not math.isfinite(v) else v for v in values]
        ax.bar(x + (i - (n - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def charts(judged: list[Run], fidelity: list[Run], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}

    def save(fig, name):
        fig.tight_layout()
        write_atomically(out, {f"{name}.png": lambda p: fig.savefig(p, dpi=120, format="png")})
        plt.close(fig)
        written[name] = f"{name}.png"

    if judged:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(SCORES) * max(1, len(judged)) / 2), 4))
        _bars(ax, list(HEADERS), [(r.label, [_get(r.data.get("aggregate"), s) for s in SCORES]) for r in judged],
              "score (1–5)")
        ax.set_ylim(0, 5)
        ax.set_title("IV-Edit scores")
        ax.legend(fontsize=8)
        save(fig, "scores")
        for key in breakdown_keys(judged):
            values = [v for v, _ in breakdown_values(judged, key)]
            series = [(r.label, [_get(((r.data.get("breakdowns") or {}).get(key) or {}).get(v), "overall")
                                 for v in values]) for r in judged]
            fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(values) * max(1, len(judged))), 4.5))
            _bars(ax, values, series, "Overall (1–5)")
            ax.set_ylim(0, 5)
            ax.set_title(f"Overall by {key}")
            ax.legend(fontsize=8)
            save(fig, f"breakdown_{key}")
    if fidelity:
        panels = [("reference", "psnr_finite", "PSNR vs reference (dB)"), ("reference", "ssim", "SSIM vs reference"),
                  ("reference", "lpips", "LPIPS vs reference"), ("background", "psnr_finite", "Background PSNR (dB)"),
                  ("background", "ssim", "Background SSIM")]
        panels = [p for p in panels if any(_get((r.data.get("aggregate") or {}).get(p[0]), p[1]) is not None
                                           for r in fidelity)]
        if panels:
            fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
            for ax, (group, key, title) in zip(axes[0], panels):
                labels = [r.label for r in fidelity]
                heights = [_get((r.data.get("aggregate") or {}).get(group), key) for r in fidelity]
                ax.bar(range(len(labels)), [h or 0.0 for h in heights], color=[f"C{i}" for i in range(len(labels))])
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
                ax.set_title(title, fontsize=9)
                ax.grid(axis="y", alpha=0.3)
            save(fig, "fidelity")
    return written


# ---------------------------------------------------------------------------------------------------- CLI
def build_report(paths, out: str | Path, labels: list[str] | None = None, plots: bool = True) -> Path:
    runs = load_runs(paths, labels)
    judged = [r for r in runs if not r.is_fidelity]
    fidelity = [r for r in runs if r.is_fidelity]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = charts(judged, fidelity, out) if plots else {}
    text = markdown(judged, fidelity, written)
    write_atomically(out, {"report.md": lambda p: p.write_text(text, encoding="utf-8")})
    return out / "report.md"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.eval.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="evaluate and/or fidelity JSON files")
    ap.add_argument("--out", required=True, help="output directory (report.md and PNG charts)")
    ap.add_argument("--labels", help="comma-separated run labels, one per input file, in order")
    ap.add_argument("--no_plots", action="store_true", help="markdown only")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        check_writable(args.out, "--out")
        path = build_report(args.inputs, args.out, labels, plots=not args.no_plots)
    except (ValueError, OSError) as e:  # OSError: an unwritable --out (the report is rescued; the message says where)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"), end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
