"""Wall time of every offline smoke run of the CLI: ``python -m replan.infer`` with each tiny backbone.

    python benchmark/tiny_cli.py                    # tiny, tiny_qwen, tiny_klein; planner and --plan runs; 2 cores
    python benchmark/tiny_cli.py --cores 0          # no pinning: every core of the machine
    python benchmark/tiny_cli.py --backbones tiny --save

Each run is a fresh process, timed from start to exit, exactly as a new user types it (default steps, the tiny
planner). The first run of each backbone uses an empty ``REPLAN_CACHE`` and so includes building the tiny random
components (cold); the next ones reuse them (warm). ``--cores N`` pins the runs to the first N CPUs, like the 2-core
machines CI and new users have. Target to report (never asserted): every run under 40 s on 2 cores. The load average
is recorded: other work on the machine slows every run. Results go to ``outputs/benchmarks/tiny_cli-cpu.{json,md}``
(``--save``: ``benchmark/results/``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import add_output_flags, write_report

ROOT = Path(__file__).resolve().parents[1]
DESK = ROOT / "assets" / "examples" / "desk.png"
DESK_PLAN = ROOT / "assets" / "examples" / "desk.plan.json"
INSTRUCTION = "replace the cup that was used with a small cactus"
TARGET_S = 40.0


def command(backbone: str, mode: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "replan.infer", "--backbone", backbone, "--image", str(DESK),
           "--output_dir", str(out), "--device", "cpu"]
    if mode == "plan":
        return cmd + ["--vlm_ckpt_path", "tiny", "--instruction", INSTRUCTION]
    return cmd + ["--plan", str(DESK_PLAN)]


def run_once(cmd: list[str], env: dict, cores: list[int] | None) -> tuple[float, int, str]:
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=pin, cwd=ROOT)
    seconds = time.perf_counter() - start
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return seconds, proc.returncode, last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tiny", "tiny_qwen", "tiny_klein"])
    ap.add_argument("--cores", type=int, default=2, help="pin to the first N CPUs (0: no pinning)")
    ap.add_argument("--repeats", type=int, default=1, help="warm runs per backbone and mode")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = available[: args.cores] if args.cores and available else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        for backbone in args.backbones:
            env = {**base_env, "REPLAN_CACHE": str(Path(tmp) / f"cache-{backbone}")}  # cold first
            runs = [("plan", "cold")] + [(m, "warm") for m in ("plan", "replay") for _ in range(args.repeats)]
            for i, (mode, cache) in enumerate(runs):
                out = Path(tmp) / f"{backbone}-{i}"
                seconds, rc, last = run_once(command(backbone, mode, out), env, cores)
                row = {"backbone": backbone, "run": "planner + edit" if mode == "plan" else "--plan (no planner)",
                       "cache": cache, "seconds": round(seconds, 1), "exit": rc,
                       "under_target": rc == 0 and seconds < TARGET_S}
                if rc != 0:
                    row["error"] = last
                rows.append(row)
                print(row, flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus_used": len(cores) if cores else
            os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "target_s": TARGET_S}
    lines = ["# Tiny CLI runs (CPU)", "", ", ".join(f"{k} {v}" for k, v in meta.items()), "",
             "| backbone | run | cache | seconds | exit | under 40 s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['run']} | {r['cache']} | {r['seconds']} | {r['exit']} | "
              f"{'yes' if r['under_target'] else 'NO'} |" for r in rows]
    write_report("tiny_cli-cpu", args, {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
