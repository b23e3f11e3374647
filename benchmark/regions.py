"""Learnable-regions throughput: training samples/s (one optimiser step = both losses + backward) and inference
latency (mask prediction for one image) of ``replan.regions``.

    python benchmark/regions.py                        # CPU, tiny random CLIP/T5 (offline)
    python benchmark/regions.py --device cuda          # GPU, real sizes (CLIP ViT-L/14 @ 224, FLAN-T5-Base) with
                                                       # random weights, bf16 autocast, batch 32
Results go to ``outputs/benchmarks/regions-<device>.{json,md}`` (``--save``: ``benchmark/results/``). The proxy
generator is the offline stand-in, so the numbers cover the region module and the frozen CLIP/T5 passes only, not
the inpainting model (reported separately in the paper's budget: ≈38 samples per GPU-second on A100s, spec §6.4).
Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import add_output_flags, write_report


def save_real_size_backbones(path: Path) -> Path:
    """CLIP ViT-L/14 (224 px, projection 768) and FLAN-T5-Base shapes with random weights, offline tokenizers."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, T5Config, T5EncoderModel

    from replan.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=768)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(path / "clip")
    tiny_clip_tokenizer().save_pretrained(path / "clip")
    CLIPImageProcessor().save_pretrained(path / "clip")
    T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False)).save_pretrained(path / "t5")
    tiny_t5_tokenizer().save_pretrained(path / "t5")
    return path


def run(device: str, batch: int, steps: int, warmup: int, latency_runs: int, work: Path) -> dict:
    from replan.regions.config import GeneratorConfig, TrainConfig
    from replan.regions.descriptions import offline_pair
    from replan.regions.model import RegionGenerator
    from replan.regions.objective import ProxyGenerator, compute_losses
    from replan.testing.regions import save_tiny_regions_backbones, shape_image

    cuda = device == "cuda"
    if cuda:
        bb = save_real_size_backbones(work / "real")
        sizes = {}
        dtype, amp = torch.bfloat16, torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        bb = save_tiny_regions_backbones(work / "tiny")
        sizes = dict(image_size=32, heads=2, mlp_hidden=16, g_hidden=32)
        dtype, amp = torch.float32, torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    model = RegionGenerator.from_pretrained(str(bb / "clip"), str(bb / "t5"), torch_dtype=dtype, **sizes)
    model.head.float()
    model.to(device)
    cfg = TrainConfig(model=model.cfg)
    gen = ProxyGenerator(GeneratorConfig(kind="offline"), model, work / "gen")
    colours = ["red", "blue", "green", "yellow"]
    images = [shape_image(colours[i % 4], "square" if i % 2 else "circle", size=256) for i in range(batch)]
    texts = []
    for i in range(batch):
        t_o = f"a {colours[i % 4]} shape on a white background"
        t_ins, t_e = offline_pair(t_o)
        texts.append({"t_o": t_o, "t_ins": t_ins, "t_e": t_e, "key": str(i)})
    optim = torch.optim.AdamW(model.head.parameters(), lr=1e-4)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        pixels = model.preprocess(images)
        with amp:
            terms = compute_losses(model, model.head, cfg, pixels, texts, gen(images, pixels, texts))
        optim.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optim.step()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_s = time.perf_counter() - start
    lat = []
    with amp:
        for i in range(warmup + latency_runs):
            sync()
            t = time.perf_counter()
            model.predict([images[0]], [texts[0]["t_ins"]], size=(512, 512))
            sync()
            if i >= warmup:
                lat.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return {"device": device, "backbones": "real-size random (ViT-L/14, FLAN-T5-Base)" if cuda else "tiny random",
            "image_size": model.cfg.image_size, "patches": model.grid ** 2, "batch": batch, "steps": steps,
            "head_params": sum(p.numel() for p in model.head.parameters()),
            "train_samples_per_s": round(batch * steps / train_s, 2), "train_step_s": round(train_s / steps, 4),
            "infer_latency_ms_median": round(1000 * statistics.median(lat), 3),
            "infer_latency_ms_p90": round(1000 * sorted(lat)[int(0.9 * (len(lat) - 1))], 3),
            "max_gpu_mem_gib": round(mem, 2) if mem else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--latency-runs", type=int, default=30)
    add_output_flags(ap)
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    batch = args.batch or (32 if args.device == "cuda" else 8)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.device, batch, args.steps, args.warmup, args.latency_runs, Path(tmp))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    out = {"meta": meta, "result": result}
    md = [f"# regions benchmark ({args.device})", "",
          f"{meta['date']} · {meta['machine']} · {meta['cpu_count']} CPUs · torch {meta['torch']} · "
          f"transformers {meta['transformers']}" + (f" · {meta['gpu']}" if meta["gpu"] else ""), "",
          f"Backbones: {result['backbones']}; image {result['image_size']} px, {result['patches']} patches; "
          f"trainable head {result['head_params']:,} parameters; offline proxy generator (no inpainting model).", "",
          "| batch | train samples/s | train step (s) | inference latency median (ms) | p90 (ms) |",
          "|---|---|---|---|---|",
          f"| {result['batch']} | {result['train_samples_per_s']} | {result['train_step_s']} | "
          f"{result['infer_latency_ms_median']} | {result['infer_latency_ms_p90']} |", ""]
    write_report(f"regions-{args.device}", args, out, "\n".join(md))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
