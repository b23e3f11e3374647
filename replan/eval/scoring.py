"""IV-Edit scores from per-dimension judge scores: pure functions, no I/O.

Per sample (the official formulas; every score on the 1-5 scale):

    q, t, e, c = quality, target_following, effect, consistency     # an unscored dimension (None) counts as 0
    w = e / 5 if the effect score is present else 0
    overall  = (q + t + e + c) / 4
    weighted = (q*w + t + e + c*w) / 4
    a sample without a result image ("missing") is 0 everywhere

Aggregates (keys ``count``, ``quality``, ``target``, ``effect``, ``consistency``, ``overall``, ``weighted``: the
paper's columns Quality … Weighted) are means over ALL samples (as official: failures count as 0), plus the same means
over the fully judged samples only (status ``"ok"``) and per category value (e.g. ``referring_type: Spatial``).

A sample record, as ``replan.eval.evaluate`` writes it: ``{"scores": {dimension: int | None} | None,
"status": "ok" | "failed" | "missing", "categories": {key: value}}``. ``"failed"`` = a result image exists but at least
one dimension has no score (its other scores still count, as official).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DIMENSIONS = ("quality", "target_following", "effect", "consistency")
METRICS = ("quality", "target", "effect", "consistency", "overall", "weighted")  # keys in every aggregate
HEADERS = ("Quality", "Target", "Effect", "Consistency", "Overall", "Weighted")  # the paper's column names
STATUSES = ("ok", "failed", "missing")


def sample_metrics(scores: Mapping[str, int | None] | None) -> dict[str, float]:
    """The six metrics of one sample; ``scores`` None (no result image) gives zeros."""
    if scores is None:
        return dict.fromkeys(METRICS, 0.0)
    q, t, e, c = (float(scores.get(d) or 0) for d in DIMENSIONS)
    w = e / 5 if scores.get("effect") is not None else 0.0
    return {
        "quality": q,
        "target": t,
        "effect": e,
        "consistency": c,
        "overall": (q + t + e + c) / 4,
        "weighted": (q * w + t + e + c * w) / 4,
    }


def status_of(scores: Mapping[str, int | None] | None) -> str:
    """``"missing"`` (no result image), ``"ok"`` (all four dimensions scored) or ``"failed"``."""
    if scores is None:
        return "missing"
    return "ok" if all(scores.get(d) is not None for d in DIMENSIONS) else "failed"


def mean_metrics(rows: Iterable[Mapping[str, float]]) -> dict:
    """``{"count": n, metric: mean}``; the means are None when there is no row."""
    rows = list(rows)
    out: dict = {"count": len(rows)}
    for m in METRICS:
        out[m] = sum(r[m] for r in rows) / len(rows) if rows else None
    return out


def summarize(samples: Iterable[Mapping]) -> dict:
    """Aggregate sample records (see the module docstring).

    Returns ``{"aggregate", "judged_only", "failed", "missing", "breakdowns"}``: ``failed`` counts every sample that
    is not fully judged (status ``failed`` or ``missing``); ``breakdowns[key][value]`` holds ``count``, ``failed`` and
    the six means over all samples of that category value (failures as 0).
    """
    samples = list(samples)
    rows = []
    for s in samples:
        status = s.get("status") or status_of(s.get("scores"))
        if status not in STATUSES:
            raise ValueError(f"sample status must be one of {', '.join(STATUSES)}, got {status!r}")
        scores = None if status == "missing" else s.get("scores")
        rows.append((status, sample_metrics(scores), s.get("categories") or {}))
    breakdowns: dict[str, dict[str, dict]] = {}
    keys = sorted({k for _, _, cats in rows for k in cats})
    for key in keys:
        values = sorted({str(cats[key]) for _, _, cats in rows if key in cats})
        breakdowns[key] = {}
        for value in values:
            group = [(st, m) for st, m, cats in rows if key in cats and str(cats[key]) == value]
            entry = mean_metrics(m for _, m in group)
            entry["failed"] = sum(st != "ok" for st, _ in group)
            breakdowns[key][value] = entry
    return {
        "aggregate": mean_metrics(m for _, m, _ in rows),
        "judged_only": mean_metrics(m for st, m, _ in rows if st == "ok"),
        "failed": sum(st != "ok" for st, _, _ in rows),
        "missing": sum(st == "missing" for st, _, _ in rows),
        "breakdowns": breakdowns,
    }


def format_table(summary: Mapping, title: str = "") -> str:
    """The aggregate, judged-only and per-category means as a fixed-width text table (2 decimals)."""
    label_width = 34
    head = f"{'':<{label_width}}" + "".join(f"{h:>13}" for h in HEADERS)

    def line(label: str, entry: Mapping) -> str:
        cells = "".join(f"{'-' if entry[m] is None else format(entry[m], '.2f'):>13}" for m in METRICS)
        label = f"{label} (n={entry['count']})"
        return f"{label[:label_width]:<{label_width}}{cells}"

    lines = [title] if title else []
    lines += [head, line("all samples", summary["aggregate"]), line("judged only", summary["judged_only"])]
    for key, groups in summary.get("breakdowns", {}).items():
        lines.append(f"by {key}:")
        lines += [line("  " + value, entry) for value, entry in groups.items()]
    return "\n".join(lines)
