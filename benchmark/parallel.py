"""Ulysses context parallelism: one region edit on 1, 2 (and 4) ranks — speed-up and peak memory per rank.

    python benchmark/parallel.py                                   # CPU, gloo, tiny Kontext: proves the plumbing only
    python benchmark/parallel.py --device cuda --ranks 1 2 4       # GPUs: FLUX.1 Kontext shapes, 1024², 6 regions
    python benchmark/parallel.py --device cuda --model black-forest-labs/FLUX.1-Kontext-dev   # the real checkpoint
    python benchmark/parallel.py --real-shapes --shrink --size 256 --steps 1 --repeats 1       # the GPU path, on a CPU

For each rank count N the script starts N processes (``torchrun --nproc_per_node N`` of this file with ``--worker``;
N = 1 runs without parallelism). Every rank loads the editor, makes one warm-up edit and ``--repeats`` timed edits of
the same plan, and reports its median edit time and its peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS). The table gives the slowest rank's median, the speed-up over one rank, every rank's peak and the
largest pixel difference from the one-rank image.

On a GPU without ``--model`` the editor is FLUX.1 Kontext with the real transformer shape (19 double + 38 single
blocks, 24 heads × 128; random bf16 weights — timing does not depend on the values) and tiny text encoders and VAE of
the right widths: the transformer is what context parallelism splits; the text encoders run on every rank. The
plan has 6 regions with official 512-token hints: 512 + 6·512 + 2·4096 = 11,776 tokens at 1024². Goal (never
asserted): Ulysses-2 ≥ 1.5× (diffusers reports 1.54× for plain FLUX.1 at Ulysses-2).

On the CPU the ranks are gloo processes sharing the cores, so the speed-up says nothing; the run checks that every
rank count produces the same image. Results go to ``outputs/benchmarks/parallel-<device>.{json,md}``; with
``--save`` to ``benchmark/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from attention_masks import environment  # noqa: E402

from replan.plan import Region, RegionPlan  # noqa: E402

OUTPUTS, RESULTS = ROOT / "outputs" / "benchmarks", Path(__file__).parent / "results"
HINTS = ["a red apple", "a small cactus in a pot", "a blue mug", "a stack of books", "a golden watch", "a green leaf"]


def regions_plan(size: int, n: int) -> RegionPlan:
    """``n`` boxes in two rows over a ``size``² image, neighbours overlapping a little."""
    cols = -(-n // 2)
    w, h = size / cols, size / 2
    boxes = [(max(0, c * w - 8), r * h + 8, min(size, (c + 1) * w + 8), (r + 1) * h - 8)
             for r in range(2) for c in range(cols)][:n]
    return RegionPlan("tidy up the desk", [Region(b, HINTS[i % len(HINTS)]) for i, b in enumerate(boxes)],
                      image_size=(size, size))


# ---------------------------------------------------------------------------------------------------- editors
def kontext_real_shapes(device, dtype, shrink: bool = False):
    """FLUX.1 Kontext: the real transformer shape (random weights), tiny CLIP/T5/VAE of the widths it expects.

    ``shrink``: one block of each kind and two heads (the same widths elsewhere) — to check this path on a CPU."""
    from backbones import REAL, random_transformer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from replan.backbones.flux_kontext import FluxKontextEditor
    from replan.backbones.registry import resolve
    from replan.testing import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(0)
    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=64,
                                        num_attention_heads=2, num_hidden_layers=1, projection_dim=768,
                                        max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=4096, d_kv=64, d_ff=64, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, is_encoder_decoder=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    spec = REAL["flux_kontext"]
    if shrink:
        spec = {**spec, "config": {**spec["config"], "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}}
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                               tokenizer_2=tok2, transformer=random_transformer(spec, device, dtype))
    pipe.to(device, dtype)
    return FluxKontextEditor(pipe, resolve("flux_kontext"))


def load(args, device):
    from replan.backbones import load_editor

    if args.model:
        return load_editor("flux", args.model, device=device)
    if device.type == "cpu" and not args.real_shapes:
        return load_editor("tiny", device=device)
    return kontext_real_shapes(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.shrink)


# ---------------------------------------------------------------------------------------------------- one rank
def worker(args) -> None:
    """One rank: load, warm up, time ``repeats`` edits; write this rank's row (and rank 0's image)."""
    from diffusers import ContextParallelConfig

    from replan.distributed import init_distributed

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if ranks > 1:
        if device.type == "cpu":
            from replan.testing.parallel import allow_cpu

            allow_cpu()
        device = init_distributed(args.device)
    editor = load(args, device)
    editor.pipe.set_progress_bar_config(disable=True)
    if ranks > 1:
        editor.enable_parallel(ContextParallelConfig(ulysses_degree=ranks))
    if args.compile:
        editor.compile()
    size = args.size if device.type == "cuda" or args.model or args.real_shapes else 128
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    plan = regions_plan(size, args.regions)
    options = {"steps": args.steps, "seed": 0}

    def edit():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = editor.edit(image, plan, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    out, _ = edit()  # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [edit()[1] for _ in range(args.repeats)]
    rank = editor.group.rank
    row = {"ranks": ranks, "rank": rank, "tokens": out.layout.total_len, "edit_s": round(statistics.median(times), 3),
           "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    out_dir = Path(args.worker)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(row))
    if rank == 0:
        np.save(out_dir / "image.npy", np.asarray(out.image))
    if ranks > 1:
        from replan.distributed import shutdown

        shutdown()


# ---------------------------------------------------------------------------------------------------- all counts
def run_ranks(n: int, args, tmp: Path) -> tuple[list[dict], np.ndarray]:
    out = tmp / f"ranks{n}"
    out.mkdir()
    forwarded = ["--device", args.device, "--regions", str(args.regions), "--steps", str(args.steps),
                 "--repeats", str(args.repeats), "--size", str(args.size), "--worker", str(out)]
    forwarded += (["--model", args.model] if args.model else []) + (["--compile"] if args.compile else [])
    forwarded += (["--real-shapes"] if args.real_shapes else []) + (["--shrink"] if args.shrink else [])
    script = str(Path(__file__).resolve())
    if n == 1:
        cmd = [sys.executable, script, *forwarded]
    else:
        from replan.distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *forwarded]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # the same per rank for every count (the ranks share the cores anyway)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{n} rank(s) failed:\n{done.stderr[-4000:]}")
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    return rows, np.load(out / "image.npy")


def summarise(per_count: dict[int, list[dict]], images: dict[int, np.ndarray]) -> list[dict]:
    base = max(r["edit_s"] for r in per_count[min(per_count)])
    table = []
    for n, rows in per_count.items():
        slowest = max(r["edit_s"] for r in rows)
        diff = int(np.abs(images[n].astype(int) - images[min(images)].astype(int)).max())
        table.append({"ranks": n, "tokens": rows[0]["tokens"], "edit_s": slowest,
                      "speedup": round(base / slowest, 2), "peak_mb_per_rank": [r["peak_mb"] for r in rows],
                      "max_pixel_diff_vs_1": diff})
    return table


def to_markdown(report: dict) -> str:
    lines = [f"# Ulysses context parallelism ({report['env']['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()] + [f"- setting: {report['setting']}", ""]
    keys = list(report["rows"][0])
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (one GPU per rank)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="rank counts (default: 1 2, GPU: 1 2 4)")
    ap.add_argument("--regions", type=int, default=6)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per edit (default: 8 GPU, 2 CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024, help="GPU / --model: image side in pixels")
    ap.add_argument("--model", default=None, help="a FLUX.1 Kontext checkpoint instead of random real shapes")
    ap.add_argument("--compile", action="store_true", help="compile the transformer blocks (after parallelising)")
    ap.add_argument("--real-shapes", action="store_true", help="CPU: the GPU editor (real Kontext widths) instead of "
                    "the tiny one")
    ap.add_argument("--shrink", action="store_true", help="with the real shapes: one block of each kind, two heads "
                    "(checks the GPU path on a CPU)")
    ap.add_argument("--save", action="store_true", help="write to benchmark/results/ instead of outputs/benchmarks/")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.real_shapes = args.real_shapes or args.shrink
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (8 if gpu else 2)
    if args.worker:
        return worker(args)
    counts = args.ranks or ([1, 2, 4] if gpu else [1, 2])
    if gpu and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {max(counts)} needs {max(counts)} GPUs; {torch.cuda.device_count()} visible")
    per_count, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            per_count[n], images[n] = run_ranks(n, args, Path(tmp))
            print(f"{n} rank(s): {per_count[n]}", flush=True)
    model = args.model or ("real shapes" + (" (shrunk)" if args.shrink else "") + ", random weights")
    setting = (f"{'FLUX.1 Kontext ' + model if gpu or args.model or args.real_shapes else 'tiny Kontext'}, "
               f"{args.regions} regions, {args.steps} steps, median of {args.repeats}")
    report = {"env": environment(torch.device(args.device)), "setting": setting,
              "rows": summarise(per_count, images)}
    out = (RESULTS if args.save else OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"parallel-{torch.device(args.device).type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
