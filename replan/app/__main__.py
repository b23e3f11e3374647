"""Run the demo.

    python -m replan.app --backbone flux                       # FLUX.1 Kontext + the RePlan planner, on a GPU
    python -m replan.app --backbone klein --stage_offload cpu  # FLUX.2 klein 9B; only the active stage on the GPU
    python -m replan.app --backbone tiny --vlm_ckpt_path tiny  # offline, tiny random weights (output is noise)

Binds 127.0.0.1 unless ``--server_name`` says otherwise; ``--share`` makes a public Gradio link.
"""

from __future__ import annotations

import argparse
import sys

from replan.backbones import names
from replan.parse import PARSE_MODES
from replan.planner import BOX_FRAMES, KINDS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="flux_kontext", help=f"editor: {', '.join(names())}")
    ap.add_argument("--model", help="editor weights: hub id or local dir")
    ap.add_argument("--planner", choices=KINDS, default="local")
    ap.add_argument("--vlm_ckpt_path", help="planner checkpoint ('tiny' = offline random); for openai: the model name")
    ap.add_argument("--lora_path", help="LoRA for the diffusion editor (diffusers format), as official")
    ap.add_argument("--vlm_lora_path", help="LoRA adapter for the local planner (PEFT format; needs peft)")
    ap.add_argument("--parse", choices=PARSE_MODES, default="lenient",
                    help="how planner replies are read (official: as the official code, no repairs)")
    ap.add_argument("--base_url", help="OpenAI-compatible planner endpoint")
    ap.add_argument("--api_key")
    ap.add_argument("--no_planner", action="store_true", help="start without a planner (draw plans by hand)")
    ap.add_argument("--prompt_template", "--vlm_prompt_template_path", dest="prompt_template",
                    help="planner prompt template file (default: replan's wording of the official one)")
    ap.add_argument("--box_frame", choices=BOX_FRAMES, default="processor",
                    help="how planner boxes are read: processor (default) or original (as official)")
    ap.add_argument("--stage_offload", choices=["none", "cpu"], default="none")
    ap.add_argument("--attention", choices=["dense", "flex"], default="dense",
                    help="mask implementation (flex: use with --compile)")
    ap.add_argument("--compile", action="store_true", help="compile the editor's transformer blocks once")
    ap.add_argument("--attention_budget", default=None, help="memory the region attention of one run may use, e.g. "
                    "8GB (default: half the device's free memory); larger plans are refused with a message")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--server_name", default="127.0.0.1")
    ap.add_argument("--server_port", type=int, default=7860)
    ap.add_argument("--share", action="store_true")
    return ap


def load(args):
    import torch

    from replan.backbones.lora import lora_source
    from replan.pipeline import RePlanPipeline
    from replan.planner import load_template

    if args.lora_path:
        lora_source(args.lora_path)  # a missing LoRA is reported before any model loads
    planner_kwargs = {"parse": args.parse, "box_frame": args.box_frame}
    if args.planner == "openai":
        planner_kwargs.update({k: v for k, v in (("base_url", args.base_url), ("api_key", args.api_key)) if v})
    if args.prompt_template:
        planner_kwargs.update(template=load_template(args.prompt_template), template_name=args.prompt_template)
    return RePlanPipeline.from_pretrained(
        backbone=args.backbone, planner=None if args.no_planner else args.planner, model=args.model,
        vlm_ckpt_path=args.vlm_ckpt_path, lora_path=args.lora_path, vlm_lora_path=args.vlm_lora_path,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), torch_dtype=args.dtype,
        stage_offload=args.stage_offload, planner_kwargs=planner_kwargs, compile=args.compile,
        attention_budget=args.attention_budget,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from replan.app.ui import build_app
    except ImportError as e:
        print(f"error: the app needs gradio and gradio_image_annotation: pip install 'replan[app]' ({e})",
              file=sys.stderr)
        return 2
    try:
        from replan.pipeline import check_load

        check_load(args.backbone, args.model, None if args.no_planner else args.planner, args.vlm_ckpt_path,
                   args.vlm_lora_path, args.device, args.dtype, args.lora_path)  # before anything loads
        pipe = load(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(pipe, attention=args.attention)
    app.launch(server_name=args.server_name, server_port=args.server_port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
