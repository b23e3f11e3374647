"""Region-attention mask cost: build time (dense and BlockMask) for 1–64 regions, and masked/unmasked attention time.

    python benchmark/attention_masks.py                      # CPU: mask builds at 1024², attention at reduced heads
    python benchmark/attention_masks.py --device cuda        # GPU: real Kontext shapes (24 heads x 128, bf16)

Layout: FLUX.1 Kontext at 1024x1024 — a 64x64 noise grid and a 64x64 reference grid, a 512-token main prompt and one
512-token hint per region (official padding), regions as random boxes. Results are written to
``outputs/benchmarks/attention_masks-<device>.{json,md}`` (``benchmark/results/`` with ``--save``) with the machine,
versions and date. Targets to report (never asserted): BlockMask build ≤ 5 ms for 32 regions; masked/unmasked ≤
1.10x with flex on GPU.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from bench_io import add_output_flags, write_report

from replan.attention import GroupMembership, TokenLayout, block_mask, default_rules, dense_mask


def kontext_layout(num_regions: int, seed: int = 0, hint_len: int = 512, grid: int = 64) -> TokenLayout:
    rng = random.Random(seed)
    size = grid * 16
    boxes = []
    for _ in range(num_regions):
        w, h = rng.uniform(40, size / 3), rng.uniform(40, size / 3)
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        boxes.append((x, y, x + w, y + h))
    layout = TokenLayout.build(512, [hint_len] * num_regions, (grid, grid), [(grid, grid)])
    return layout.with_box_regions(boxes, (size, size))


def timed(fn, device, repeats: int) -> float:
    """Median wall time in ms (synchronising CUDA)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bench_builds(device, regions, repeats, max_dense_tokens):
    rows = []
    for n in regions:
        layout = kontext_layout(n)
        t = time.perf_counter()
        membership = GroupMembership.from_layout(layout)
        membership_ms = (time.perf_counter() - t) * 1000
        rules = default_rules(n)
        row = {"regions": n, "tokens": layout.total_len, "groups": len(membership.names),
               "classes": int(membership.class_groups.shape[0]), "membership_ms": round(membership_ms, 2),
               "block_mask_ms": round(timed(lambda: block_mask(membership, rules, device), device, repeats), 2)}
        if layout.total_len <= max_dense_tokens:
            row["dense_mask_ms"] = round(timed(lambda: dense_mask(membership, rules, device), device, repeats), 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_attention(device, dtype, heads, head_dim, regions, repeats, compile_flex):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    rows = []
    for n in regions:
        layout = kontext_layout(n)
        membership = GroupMembership.from_layout(layout)
        rules = default_rules(n)
        L = layout.total_len
        q, k, v = (torch.randn(1, heads, L, head_dim, device=device, dtype=dtype) for _ in range(3))
        dense = dense_mask(membership, rules, device)
        bm = block_mask(membership, rules, device)
        row = {"regions": n, "tokens": L, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
               "block_density": round(1 - bm.sparsity() / 100, 4)}
        row["sdpa_unmasked_ms"] = round(timed(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats), 2)
        row["sdpa_dense_mask_ms"] = round(
            timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), device, repeats), 2)
        row["sdpa_masked_over_unmasked"] = round(row["sdpa_dense_mask_ms"] / row["sdpa_unmasked_ms"], 3)
        if compile_flex:
            row["flex_unmasked_ms"] = round(timed(lambda: flex(q, k, v), device, repeats), 2)
            row["flex_block_mask_ms"] = round(timed(lambda: flex(q, k, v, block_mask=bm), device, repeats), 2)
            row["flex_masked_over_sdpa_unmasked"] = round(row["flex_block_mask_ms"] / row["sdpa_unmasked_ms"], 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def environment(device) -> dict:
    import diffusers
    import transformers

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
           "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def to_markdown(report: dict) -> str:
    lines = [f"# Attention-mask benchmark ({report['env']['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()] + [""]
    for title, rows in (("Mask build", report["builds"]), ("Attention", report["attention"])):
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "–")) for k in keys) + " |" for r in rows] + [""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--regions", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--attention-regions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--heads", type=int, default=None, help="default: 24 on GPU (Kontext), 4 on CPU")
    ap.add_argument("--head-dim", type=int, default=None, help="default: 128 on GPU, 64 on CPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-dense-tokens", type=int, default=48_000, help="skip dense masks above this length")
    ap.add_argument("--compile-flex", action=argparse.BooleanOptionalAction, default=None,
                    help="time compiled flex attention (default: on GPU only; ~20 s compile per shape on CPU)")
    add_output_flags(ap)
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    heads = args.heads or (24 if gpu else 4)
    head_dim = args.head_dim or (128 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    compile_flex = gpu if args.compile_flex is None else args.compile_flex
    report = {
        "env": environment(device),
        "builds": bench_builds(device, args.regions, args.repeats, args.max_dense_tokens),
        "attention": bench_attention(device, dtype, heads, head_dim, args.attention_regions, args.repeats,
                                     compile_flex),
    }
    write_report(f"attention_masks-{device.type}", args, report, to_markdown(report))


if __name__ == "__main__":
    main()
