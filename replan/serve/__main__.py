"""Run the edit server.

    python -m replan.serve --backbone flux                                   # FLUX.1 Kontext + local planner
    python -m replan.serve --backbone flux --planner none --port 8001        # the GRPO reward server
    python -m replan.serve --backbone tiny --vlm_ckpt_path tiny              # offline smoke server (noise)
    python -m replan.serve --backbone flux --planner none --replicas 8       # Ray Serve: 8 replicas, 1 GPU each
    python -m replan.serve --backbone flux --ulysses 2                       # one replica, each edit on 2 GPUs
    python -m replan.serve --backbone flux --ulysses 2 --replicas 4          # Ray Serve: 4 replicas of 2 GPUs each

Binds 127.0.0.1 unless ``--host`` says otherwise. The models load in the background: ``GET /health`` answers at
once and says ``"ready"`` when edits can run (edits get 503 + Retry-After until then). With ``--replicas`` the
replicas run under Ray Serve (``pip install "ray[serve]"``; set ``RAY_ADDRESS`` to join an existing cluster); each
loads before it takes traffic. With ``--ulysses N`` a replica starts N-1 helper processes itself and computes each
edit on N GPUs (Ulysses context parallelism, docs/parallel.md). Endpoints and contracts: ``replan/serve/__init__.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from replan.accel.cli import accel_from_args, add_accel_arguments
from replan.backbones import names
from replan.parse import PARSE_MODES

PLANNERS = ("local", "openai", "none")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="flux_kontext", help=f"editor: {', '.join(names())}")
    ap.add_argument("--model", "--diffusion_model_name", dest="model", help="editor weights: hub id or local dir")
    ap.add_argument("--planner", choices=PLANNERS, default="local",
                    help="planner for edits sent without a plan; 'none' serves plans and no_plan edits only")
    ap.add_argument("--vlm_ckpt_path", help="planner checkpoint ('tiny' = offline random); for openai: the model")
    ap.add_argument("--lora_path", help="LoRA for the diffusion editor (diffusers format), as official")
    ap.add_argument("--vlm_lora_path", help="LoRA adapter for the local planner (PEFT format; needs peft)")
    ap.add_argument("--parse", choices=PARSE_MODES, default="lenient",
                    help="how planner replies (planned here or posted) are read; official: as the official code, "
                    "no repairs (GRPO reward parity); a request may override it")
    ap.add_argument("--base_url", help="OpenAI-compatible planner endpoint (or REPLAN_PLANNER_BASE_URL)")
    ap.add_argument("--api_key", help="planner endpoint key (or REPLAN_PLANNER_API_KEY)")
    ap.add_argument("--prompt_template", "--vlm_prompt_template_path", dest="prompt_template",
                    help="planner prompt template file (default: replan's wording of the official one)")
    ap.add_argument("--box_frame", choices=["processor", "original"], default="processor",
                    help="how planner boxes are read, by this server's planner and by /v1/plans/execute unless a "
                    "request says otherwise: processor (default) or original (as the official edit server)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--stage_offload", choices=["none", "cpu"], default="none",
                    help="cpu: keep only the active stage (planner or editor) on the GPU")
    ap.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                    help="diffusers CPU offload inside the editor (excludes --stage_offload)")
    ap.add_argument("--attention", choices=["dense", "flex"], default="dense",
                    help="mask implementation (flex: use with --compile)")
    ap.add_argument("--compile", action="store_true", help="compile the editor's transformer blocks once (the first "
                    "edit of each shape pays the compile)")
    ap.add_argument("--attention_budget", default=None, help="memory the region attention of one edit may use, e.g. "
                    "8GB (default: half the device's free memory); larger plans get 413")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--queue", type=int, default=8, help="edits that may wait behind the running one, per replica "
                    "(more get 429 + Retry-After)")
    ap.add_argument("--max_image_mb", type=float, default=20.0, help="largest accepted image upload (413 above)")
    ap.add_argument("--replicas", type=int, default=None,
                    help="run N replicas under Ray Serve (needs ray[serve]); default: one in-process replica")
    ap.add_argument("--gpus_per_replica", type=float, default=None,
                    help="Ray Serve: GPUs per replica (0: CPU; default: --ulysses)")
    ap.add_argument("--ulysses", type=int, default=1,
                    help="GPUs computing each edit together (Ulysses context parallelism; the replica starts N-1 "
                         "helper processes)")
    ap.add_argument("--ulysses_anything", action="store_true",
                    help="allow unequal Ulysses chunks (image sizes or head counts that do not divide by --ulysses)")
    ap.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    add_accel_arguments(ap)
    return ap


def config_from_args(args):
    from replan.serve.app import ServeConfig

    return ServeConfig(
        backbone=args.backbone, model=args.model, planner=args.planner, vlm_ckpt_path=args.vlm_ckpt_path,
        lora_path=args.lora_path, vlm_lora_path=args.vlm_lora_path, parse=args.parse, base_url=args.base_url,
        api_key=args.api_key, prompt_template=args.prompt_template, box_frame=args.box_frame, device=args.device,
        dtype=args.dtype,
        stage_offload=args.stage_offload, offload=args.offload, attention=args.attention, queue=args.queue,
        max_image_mb=args.max_image_mb, compile=args.compile, attention_budget=args.attention_budget,
        ulysses=args.ulysses, ulysses_anything=args.ulysses_anything,
        accel=_accel(args),
    )


def _accel(args):
    accel = accel_from_args(args)
    return accel.describe() if accel.enabled else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.offload != "none" and args.stage_offload != "none":
        print("error: use either --stage_offload or --offload, not both", file=sys.stderr)
        return 2
    try:
        from replan.pipeline import check_load

        if args.replicas is None or args.gpus_per_replica == 0:  # Ray replicas pick their own devices
            check_load(args.backbone, args.model, args.planner if args.planner in ("local", "openai") else None,
                       args.vlm_ckpt_path, args.vlm_lora_path, args.device, args.dtype, args.lora_path)
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.replicas is not None:
        if args.replicas < 1:
            print("error: --replicas must be >= 1", file=sys.stderr)
            return 2
        from replan.serve.ray_app import RayServeMissing, serve_forever

        gpus = float(args.ulysses) if args.gpus_per_replica is None else args.gpus_per_replica
        if args.ulysses > 1 and gpus < args.ulysses:
            print(f"error: --ulysses {args.ulysses} needs at least {args.ulysses} GPUs per replica", file=sys.stderr)
            return 2
        try:
            serve_forever(config, args.replicas, host=args.host, port=args.port, gpus_per_replica=gpus,
                          log_level=args.log_level)
        except RayServeMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        import uvicorn

        from replan.serve.app import create_app
    except ImportError as e:
        print(f"error: the server needs fastapi, uvicorn and python-multipart: pip install 'replan[serve]' ({e})",
              file=sys.stderr)
        return 2
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
