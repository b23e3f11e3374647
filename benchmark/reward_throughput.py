"""Stage-2 reward path throughput: edits/s and judge calls/s of ``replan.train.remote.Stage2Reward`` vs concurrency.

    python benchmark/reward_throughput.py                                   # stand-in servers on 127.0.0.1 (CPU)
    python benchmark/reward_throughput.py --edit-latency 0.2 --judge-latency 0.05 --samples 64
    python benchmark/reward_throughput.py --edit-url http://127.0.0.1:8001 --judge-url http://127.0.0.1:8000/v1 \\
        --judge-model Qwen/Qwen2.5-VL-72B-Instruct                          # real servers (e.g. replan.serve)

Each sample is a valid plan on a small synthetic image, so every sample is executed (1 edit) and judged (3 calls).
The stand-ins answer after a fixed latency: the numbers measure the client (encoding, HTTP, thread pools,
semaphores) and how well it overlaps slow servers; with concurrency c (3c judge calls) the ceiling is c / max(edit
latency, judge latency) edits/s. Results go to ``outputs/benchmarks/reward_throughput-<device>.{json,md}``
(``--save``: ``benchmark/results/``). Target to report (never asserted): edits/s within 80 % of the ceiling up to c
= 8 with the default stand-in latencies (2-core CPU).

``StandIns`` (the two stand-in servers, with fault injection) is also what the training tests use.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

from common import add_output_flags, write_report  # noqa: E402

from replan.testing.standins import JUDGE_MODEL, StandIns, samples  # noqa: E402


def run_one(edit_url: str, judge_url: str, judge_model: str, concurrency: int, n: int) -> dict:
    from replan.train.remote import RewardConfig

    cfg = RewardConfig(edit_url=edit_url, judge_url=judge_url, judge_model=judge_model, concurrency=concurrency,
                       judge_concurrency=3 * concurrency, edit_retries=0, judge_retries=0, backoff=0.0,
                       ready_timeout=60.0, ready_interval=0.1)
    reward = cfg.build()
    try:
        reward(samples(1))  # readiness + warm-up
        start = time.perf_counter()
        results = reward(samples(n))
        seconds = time.perf_counter() - start
    finally:
        reward.close()
    executed = sum(bool(r["executed"]) for r in results)
    failed = sum(bool(r["edit_failed"]) or bool(r["judge_failed"]) for r in results)
    return {"concurrency": concurrency, "samples": n, "seconds": round(seconds, 4), "executed": executed,
            "failed": failed, "edits_per_s": round(executed / seconds, 2),
            "judge_calls_per_s": round(3 * executed / seconds, 2),
            "mean_overall": round(sum(r["overall"] for r in results) / max(1, len(results)), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--edit-latency", type=float, default=0.1, help="stand-in seconds per edit")
    ap.add_argument("--judge-latency", type=float, default=0.02, help="stand-in seconds per judge call")
    ap.add_argument("--edit-url", default=None, help="a real edit server instead of the stand-in")
    ap.add_argument("--judge-url", default=None, help="a real OpenAI-compatible judge (…/v1) instead of the stand-in")
    ap.add_argument("--judge-model", default=JUDGE_MODEL)
    add_output_flags(ap)
    args = ap.parse_args(argv)

    standins = None
    if args.edit_url is None or args.judge_url is None:
        standins = StandIns(edit_latency=args.edit_latency, judge_latency=args.judge_latency,
                            judge_model=args.judge_model).__enter__()
    edit_url = args.edit_url or standins.edit_url
    judge_url = args.judge_url or standins.judge_url
    rows = []
    try:
        for c in args.concurrency:
            row = run_one(edit_url, judge_url, args.judge_model, c, args.samples)
            if standins is not None:
                row["ceiling_edits_per_s"] = round(c / max(args.edit_latency, args.judge_latency, 1e-9), 2)
            rows.append(row)
            print(json.dumps(row))
    finally:
        if standins is not None:
            standins.__exit__(None, None, None)

    device = "real" if standins is None else "cpu"
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "python": platform.python_version(), "servers": "stand-ins" if standins else {"edit": edit_url,
                                                                                        "judge": judge_url},
            "edit_latency": args.edit_latency if standins else None,
            "judge_latency": args.judge_latency if standins else None}
    lines = ["# Stage-2 reward throughput", "", f"{meta['date']}, {meta['machine']}, Python {meta['python']}, "
             f"servers: {meta['servers']}" + (f" (edit {args.edit_latency} s, judge {args.judge_latency} s)"
                                              if standins else ""), "",
             "| concurrency | samples | seconds | edits/s | ceiling edits/s | judge calls/s | failed |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['samples']} | {r['seconds']} | {r['edits_per_s']} | "
              f"{r.get('ceiling_edits_per_s', '-')} | {r['judge_calls_per_s']} | {r['failed']} |" for r in rows]
    write_report(f"reward_throughput-{device}", args, {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
