"""Fill the descriptions cache before training: (t_o, t_ins, t_e) for every pair, many LLM requests in flight.

    python -m replan.regions.describe --config configs/regions/cc12m_8gpu.yaml [key=value ...] [--part 0/4]

Training asks the LLM for each sample's edit instruction and target caption; at millions of pairs those calls belong
in a pass of their own, on GPUs that serve the LLM (vLLM), before the GPUs train. This pass reads the training data
exactly as the trainer does (same sources, same bad-sample rules) and appends to ``descriptions.cache`` the rows the
trainer will look up (same key, same LLM/prompt fingerprint), so the training run reuses all of them and says so.
``--part i/n`` reads only every n-th shard group (i = 0 … n−1): n processes or machines fill the cache together
(give each its own cache file and concatenate them, or share one file on a local disk: rows are appended whole).
Interrupted? Run it again: rows already in the cache are skipped (only re-read).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from replan.regions.config import load_config

logger = logging.getLogger("replan.regions.describe")


def describe(cfg, part: int = 0, parts: int = 1, progress: bool = True) -> dict:
    """One pass over epoch 0's data of ``part`` of ``parts``; returns the counts."""
    from tqdm.auto import tqdm

    from replan.regions.data import open_data, skip_counts
    from replan.regions.descriptions import Describer

    batch = max(16, 4 * cfg.descriptions.concurrency)
    data = open_data(cfg.data, batch, cfg.seed, rank=part, world=parts)
    describer = Describer(cfg.descriptions)
    skipped, failed = skip_counts(), 0
    with tqdm(desc="descriptions", unit="pair", disable=not progress) as bar:
        for item in data.items(0, None):
            for k, v in item["skipped"].items():
                skipped[k] += int(v)
            rows = describer.many(item["samples"])
            failed += sum(isinstance(r, Exception) for r in rows)
            bar.update(len(rows))
    return {"reused": describer.reused, "generated": describer.generated, "failed": failed,
            "stale": describer.stale, "skipped": skipped, "cache": cfg.descriptions.cache}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replan.regions.describe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the training config (its data and descriptions sections)")
    ap.add_argument("--part", default="0/1", help="i/n: this process's share of the shards (default 0/1: all)")
    ap.add_argument("overrides", nargs="*", help="key=value, as for replan.regions.train")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        part, parts = (int(x) for x in args.part.split("/"))
        if not 0 <= part < parts:
            raise ValueError
    except ValueError:
        print(f"error: --part must look like i/n with 0 <= i < n, got {args.part!r}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.descriptions.cache:
            raise ValueError("descriptions.cache is not set: name the JSONL file the training run will read")
        result = describe(cfg, part, parts)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
