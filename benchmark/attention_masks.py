"""Region-attention masks: build cost (dense additive mask, BlockMask) for 1–64 regions with official padded hints
and with trimmed hints, their memory, and masked vs unmasked attention time.

    python benchmark/attention_masks.py                      # CPU: builds at 1024², attention at reduced heads
    python benchmark/attention_masks.py --compile-flex       #      + compiled FlexAttention (~20 s compile per shape)
    python benchmark/attention_masks.py --device cuda        # GPU: real Kontext attention shapes (24 x 128, bf16)

Layout: FLUX.1 Kontext at 1024x1024 — a 64x64 noise grid and a 64x64 reference grid, a 512-token main prompt and one
hint per region: 512 tokens (official T5 padding) or 8 tokens (trimmed); regions are random boxes. Writes
``outputs/benchmarks/attention_masks-<device>.{json,md}`` (``--save``: ``benchmark/results/``). Reported, never
asserted: BlockMask build ≤ 5 ms for 32 regions; masked/unmasked ≤ 1.10x with compiled flex on GPU.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import add_output_flags, environment, timed, to_markdown, write  # noqa: E402

from replan.attention import (  # noqa: E402
    GroupMembership,
    TokenLayout,
    additive_mask,
    attention_cost,
    block_mask,
    default_rules,
)
from replan.attention.budget import format_bytes  # noqa: E402

TRIMMED_HINT = 8  # a typical hint's real T5 tokens (+ EOS)


def kontext_layout(num_regions: int, hint_len: int = 512, seed: int = 0, grid: int = 64) -> TokenLayout:
    rng = random.Random(seed)
    size = grid * 16
    boxes = []
    for _ in range(num_regions):
        w, h = rng.uniform(40, size / 3), rng.uniform(40, size / 3)
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        boxes.append((x, y, x + w, y + h))
    layout = TokenLayout.build(512, [hint_len] * num_regions, (grid, grid), [(grid, grid)])
    return layout.with_box_regions(boxes, (size, size))


def bench_builds(device, dtype, regions, repeats, max_dense_tokens):
    rows = []
    for n in regions:
        for hints in ("padded", "trimmed"):
            layout = kontext_layout(n, 512 if hints == "padded" else TRIMMED_HINT)
            t = time.perf_counter()
            membership = GroupMembership.from_layout(layout)
            membership_ms = (time.perf_counter() - t) * 1000
            rules = default_rules(n)
            L = layout.total_len
            row = {"regions": n, "hints": hints, "tokens": L, "classes": int(membership.class_groups.shape[0]),
                   "membership_ms": round(membership_ms, 2),
                   "block_mask_ms": round(timed(lambda: block_mask(membership, rules, device), device, repeats), 2),
                   "dense_mask_bytes": format_bytes(attention_cost(L, 1, "dense", dtype).mask)}
            if L <= max_dense_tokens:
                row["dense_mask_ms"] = round(
                    timed(lambda: additive_mask(membership, rules, dtype, device), device, repeats), 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_attention(device, dtype, heads, head_dim, regions, repeats, compile_flex):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else None
    rows = []
    for n in regions:
        layout = kontext_layout(n)
        membership = GroupMembership.from_layout(layout)
        rules = default_rules(n)
        L = layout.total_len
        q, k, v = (torch.randn(1, heads, L, head_dim, device=device, dtype=dtype) for _ in range(3))
        dense = additive_mask(membership, rules, dtype, device)
        bm = block_mask(membership, rules, device)
        row = {"regions": n, "tokens": L, "heads": heads, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1],
               "block_density": round(1 - bm.sparsity() / 100, 4)}
        row["sdpa_unmasked_ms"] = round(timed(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats), 2)
        row["sdpa_dense_ms"] = round(
            timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), device, repeats), 2)
        row["sdpa_dense_over_unmasked"] = round(row["sdpa_dense_ms"] / row["sdpa_unmasked_ms"], 3)
        if flex is not None:
            row["flex_unmasked_ms"] = round(timed(lambda: flex(q, k, v), device, repeats), 2)
            row["flex_masked_ms"] = round(timed(lambda: flex(q, k, v, block_mask=bm), device, repeats), 2)
            row["flex_masked_over_flex_unmasked"] = round(row["flex_masked_ms"] / row["flex_unmasked_ms"], 3)
            row["flex_masked_over_sdpa_unmasked"] = round(row["flex_masked_ms"] / row["sdpa_unmasked_ms"], 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
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
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    heads = args.heads or (24 if gpu else 4)
    head_dim = args.head_dim or (128 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    compile_flex = gpu if args.compile_flex is None else args.compile_flex
    report = {
        "env": environment(device),
        "builds": bench_builds(device, dtype, args.regions, args.repeats, args.max_dense_tokens),
        "attention": bench_attention(device, dtype, heads, head_dim, args.attention_regions, args.repeats,
                                     compile_flex),
    }
    notes = [f"Kontext layout at 1024²: 8192 image tokens, a 512-token main prompt, hints of 512 (padded) or "
             f"{TRIMMED_HINT} (trimmed) tokens; dense masks in {str(dtype).split('.')[-1]}."]
    markdown = to_markdown("Attention-mask benchmark", report,
                           {"Mask build": report["builds"], "Attention": report["attention"]}, notes)
    write("attention_masks", device, report, markdown, args.save, args.out)


if __name__ == "__main__":
    main()
