"""Time to parse pathological planner replies (the cases the tests check for correctness, timed here instead).

    python benchmark/parse_worst_case.py            # strict + lenient parse_plan and the stage-1 editing score
    python benchmark/parse_worst_case.py --save

A planner (or a policy during GRPO) can answer with a megabyte of repeated tags, deeply nested brackets or a
truncated region list. Parsing must stay linear in the reply's length: the tests assert what comes out, this script
measures how long it takes, at 1 MB and at 2 MB (a linear parser takes about twice as long). Target to report
(never asserted): every 1 MB case under 1 s on one CPU core, and a 2 MB / 1 MB ratio near 2. Results go to
``outputs/benchmarks/parse_worst_case-cpu.{json,md}`` (``--save``: ``benchmark/results/``).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone

from common import add_output_flags, write_report

from replan.parse import PlanParseError, parse_plan
from replan.train.rewards import editing_score

HEAD = "<think>t</think><gen_image>g</gen_image>"
REGION = '{"bbox_2d": [10, 20, 30, 40], "hint": "a"}'


def cases(size: int) -> dict[str, str]:
    """Replies of about ``size`` characters, one per failure shape."""
    half = size // 2
    return {
        "prose without tags": ("lorem ipsum, dolor sit amet. " * (size // 29 + 1))[:size],
        "long reasoning": f"<think>{'x' * size}</think><gen_image>g</gen_image><region>[{REGION}]</region>",
        "truncated region list": HEAD + "<region>[" + (REGION + ", ") * (size // (len(REGION) + 2)) + REGION[:20],
        "repeated <think>": "<think>" * (size // 7),
        "repeated <region>[{": "<region>[{" * (size // 10),
        "open brackets": HEAD + "<region>" + "[" * size,
        "nested objects": HEAD + "<region>[" + '{"a":' * (half // 5) + "1" + "}" * (half // 5) + "]</region>",
    }


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call costs (imports, regex compilation) are not the parser's scaling
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def strict(text):
    try:
        parse_plan(text, (640, 480), strict=True)
    except PlanParseError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megabytes", type=float, nargs=2, default=[1.0, 2.0], help="the two reply sizes compared")
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    small, large = (int(mb * (1 << 20)) for mb in args.megabytes)
    rows = []
    for (name, text), big in zip(cases(small).items(), cases(large).values()):
        row = {"case": name}
        for label, fn in (("lenient", lambda t: parse_plan(t, (640, 480))), ("strict", strict),
                          ("editing_score", editing_score)):
            a, b = timed(lambda: fn(text), args.repeats), timed(lambda: fn(big), args.repeats)
            row[f"{label}_ms"] = round(1000 * a, 1)
            row[f"{label}_ratio"] = round(b / a, 2) if a > 0 else None
        rows.append(row)
        print(row, flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "sizes_mb": args.megabytes}
    keys = list(rows[0])
    lines = ["# Parsing pathological replies (CPU)", "", ", ".join(f"{k} {v}" for k, v in meta.items()), "",
             "Times at the first size; ratio = time at the second size / time at the first (linear ≈ size ratio).",
             "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    write_report("parse_worst_case-cpu", args, {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
