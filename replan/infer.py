"""Plan and edit from the command line.

    python -m replan.infer --image photo.jpg --instruction "replace the cup that was used with a cactus"
    python -m replan.infer --image photo.jpg --plan outputs/infer/plan.json          # replay / hand-edited plan
    python -m replan.infer --image photo.jpg --instruction "make it snowy" --no_plan  # the stock backbone alone
    python -m replan.infer --backbone tiny --vlm_ckpt_path tiny --image assets/examples/desk.png \\
        --instruction "replace the used cup with a cactus"                           # offline smoke run
    python -m replan.infer --backbone flux                                           # interactive: read from stdin
    torchrun --nproc_per_node 2 -m replan.infer --ulysses 2 --image photo.jpg --instruction "…"   # 2 GPUs per edit

The output directory gets ``result.png``, ``plan.json``, ``overlay.png``, ``config.json`` (everything needed to
replay) and, when the planner ran, ``planner_response.txt``. Files appear only when the edit succeeded, all at once
(``replan.io``); if they cannot be written the result is saved to a fallback folder that the error names.

Every argument, the image (decoded and size-checked), the plan file and the output directory are checked before any
model loads. Without ``--image`` the models are loaded once and pairs of lines (image path, instruction) are read
from stdin until EOF; each pair is checked before it is planned, and each edit goes to its own numbered
sub-directory. Exit codes: 0 done, 2 bad input or unwritable output, 3 planner or endpoint failure.

With ``--ulysses N`` under ``torchrun --nproc_per_node N`` the N processes compute each edit together (Ulysses context
parallelism, docs/parallel.md): rank 0 plans, reads stdin and writes the outputs; the result equals the one-GPU
result up to float noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from replan import __version__
from replan.accel.cli import accel_flags, accel_from_args, add_accel_arguments
from replan.attention import parse_bytes
from replan.backbones import names
from replan.backbones.parallel import check_accel_parallel
from replan.backbones.registry import BackboneSpec
from replan.distributed import EditGroup, shutdown
from replan.inputs import check_edit_options, check_instruction, check_number, read_image, read_plan
from replan.io import OutputError, check_writable, write_outputs
from replan.parse import PARSE_MODES, PlanParseError, parse_mode
from replan.pipeline import STAGE_OFFLOAD, RePlanPipeline, check_load, no_regions_note
from replan.plan import RegionPlan
from replan.planner import BOX_FRAMES, KINDS, PlannerError, load_planner, load_template

logger = logging.getLogger("replan.infer")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="input image; omit for the interactive loop")
    ap.add_argument("--instruction", help="the editing instruction")
    ap.add_argument("--output_dir", default="outputs/infer", help="where result.png, plan.json, … are written")
    ap.add_argument("--backbone", default="flux_kontext", help=f"editor: {', '.join(names())}")
    ap.add_argument("--model", "--diffusion_model_name", dest="model", help="editor weights: hub id or local dir")
    ap.add_argument("--planner", choices=KINDS, default="local", help="local Qwen2.5-VL or an OpenAI-compatible API")
    ap.add_argument("--vlm_ckpt_path", help="planner checkpoint (hub id or local dir; 'tiny' = offline random)")
    ap.add_argument("--lora_path", help="LoRA for the diffusion editor (diffusers format; a dir, a .safetensors file "
                    "or a hub id), loaded with load_lora_weights as official")
    ap.add_argument("--vlm_lora_path", help="LoRA adapter for the local planner (PEFT format; needs peft)")
    ap.add_argument("--base_url", help="OpenAI-compatible endpoint (or REPLAN_PLANNER_BASE_URL)")
    ap.add_argument("--api_key", help="endpoint key (or REPLAN_PLANNER_API_KEY)")
    ap.add_argument("--planner_retries", type=int, default=4, help="endpoint retries on 5xx/timeouts")
    ap.add_argument("--prompt_template", "--vlm_prompt_template_path", dest="prompt_template",
                    help="planner prompt template file, e.g. the official one from 'python -m replan.templates "
                    "fetch' (default: replan's wording of it)")
    ap.add_argument("--box_frame", choices=BOX_FRAMES, default="processor",
                    help="how planner boxes are read: processor = in the frame the VLM saw, mapped to the image "
                    "(default); original = as image pixels, as official")
    ap.add_argument("--plan", help="a plan JSON to execute instead of planning")
    ap.add_argument("--no_plan", action="store_true", help="baseline: the instruction as the global prompt, no regions")
    ap.add_argument("--parse", choices=PARSE_MODES, default=None,
                    help="how planner replies are read: lenient (default; repairs and records), strict (fail on a "
                    "malformed reply) or official (as the official code: no repairs, else a global edit)")
    ap.add_argument("--strict_plan", action="store_true", help="the same as --parse strict")
    ap.add_argument("--stage_offload", choices=STAGE_OFFLOAD, default="none",
                    help="cpu: keep only the active stage (planner or editor) on the GPU")
    ap.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                    help="diffusers CPU offload inside the editor (excludes --stage_offload)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the backbone's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the backbone's)")
    ap.add_argument("--expand", "--expand_value", dest="expand", type=float, default=None,
                    help="box expansion (default: the backbone's CLI value)")
    ap.add_argument("--expand_mode", choices=["ratio", "pixels"], default=None)
    ap.add_argument("--switch_ratio", "--attention_switch_step", dest="switch_ratio", type=float, default=None,
                    help="rule switch: ratio <= 1 of the steps or an absolute step (default: the backbone's)")
    ap.add_argument("--attention", choices=["dense", "flex"], default="dense",
                    help="mask implementation (flex: use with --compile)")
    ap.add_argument("--compile", action="store_true", help="compile the editor's transformer blocks once (the first "
                    "edit of each shape pays the compile, later edits reuse it)")
    ap.add_argument("--attention_budget", default=None, help="memory the region attention of one edit may use, e.g. "
                    "8GB (default: half the device's free memory); larger plans are refused before any model work")
    ap.add_argument("--trim_hint_padding", action=argparse.BooleanOptionalAction, default=None,
                    help="run the hints without their padding tokens (default: only when the padded layout is over "
                    "the attention budget)")
    ap.add_argument("--ulysses", type=int, default=1,
                    help="GPUs computing each edit together (Ulysses context parallelism); launch with "
                         "'torchrun --nproc_per_node N -m replan.infer --ulysses N'")
    ap.add_argument("--ulysses_anything", action="store_true",
                    help="allow unequal Ulysses chunks (image sizes or head counts that do not divide by --ulysses)")
    ap.add_argument("--only_save_image", action="store_true", help="write result.png only")
    ap.add_argument("-v", "--verbose", action="store_true")
    add_accel_arguments(ap)
    return ap


def edit_options(args) -> dict:
    options = {"steps": args.steps, "seed": args.seed, "expand": args.expand, "expand_mode": args.expand_mode,
               "switch": args.switch_ratio, "attention": args.attention}
    if args.guidance is not None:
        options["guidance"] = args.guidance
    if args.trim_hint_padding is not None:
        options["trim_hint_padding"] = args.trim_hint_padding
    accel = accel_from_args(args)
    if accel.enabled:
        options["accel"] = accel
    return options


def check_accel(args, spec: BackboneSpec) -> None:
    """The acceleration settings against the backbone and step count, before any model loads."""
    config = accel_from_args(args).resolved(spec.name, spec.family, spec.steps if args.steps is None else args.steps)
    config.check_editor_options(compile=args.compile, attention=args.attention)


# ---------------------------------------------------------------------------------------------------- checks
@dataclass
class Job:
    """One checked edit: the decoded image, the instruction and the plan to execute (None: plan it)."""

    image_path: str
    image: object
    instruction: str | None
    plan: RegionPlan | None


@dataclass
class Setup:
    """What the checks resolved before anything loads."""

    spec: BackboneSpec
    device: str
    template: str | None = None
    planner: object = None  # an endpoint planner, built (it loads nothing) so that its settings are checked
    job: Job | None = None  # the one-shot edit, checked
    parallel: object = None  # the ContextParallelConfig of --ulysses N (None for one process)


def check_args(args) -> Setup:
    """Check every argument that can be checked without a model; ``ValueError`` with one line otherwise."""
    if args.plan and args.no_plan:
        raise ValueError("--plan and --no_plan exclude each other: pick one")
    if args.image is None and args.instruction:
        raise ValueError("--instruction needs --image (omit both for the interactive mode)")
    parallel = parallel_config(args)  # --ulysses (and --accel with it)
    needs_planner = not (args.plan or args.no_plan)
    spec, device = check_load(args.backbone, args.model, args.planner if needs_planner else None,
                              args.vlm_ckpt_path, args.vlm_lora_path, args.device, args.dtype, args.lora_path)
    check_edit_options(spec, steps=args.steps, guidance=args.guidance, expand=args.expand,
                       switch=args.switch_ratio, seed=args.seed)
    check_number("--planner_retries", args.planner_retries, minimum=0, integer=True)
    parse_bytes(args.attention_budget)  # a size such as 8GB
    check_accel(args, spec)
    if args.offload != "none" and args.stage_offload != "none":
        raise ValueError("--offload and --stage_offload exclude each other: use one of them")
    setup = Setup(spec, device, parallel=parallel)
    if needs_planner:
        parse_mode(args.parse, args.strict_plan)
        setup.template = load_template(args.prompt_template) if args.prompt_template else None
        if args.planner == "openai":
            setup.planner = load_planner("openai", args.vlm_ckpt_path, **planner_options(args, setup.template),
                                         **endpoint(args))
    if args.image is not None:
        setup.job = read_job(args, setup, args.image, args.instruction)
    check_writable(args.output_dir, "--output_dir")
    return setup


def planner_options(args, template: str | None) -> dict:
    """How the planner prompts and reads: template (and its name), box frame, parse mode."""
    options = {"box_frame": args.box_frame, "parse": parse_mode(args.parse, args.strict_plan)}
    if template is not None:
        options.update(template=template, template_name=args.prompt_template)
    return options


def endpoint(args) -> dict:
    kwargs = {k: v for k, v in (("base_url", args.base_url), ("api_key", args.api_key)) if v}
    kwargs["max_retries"] = args.planner_retries
    return kwargs


def read_job(args, setup: Setup, image_path: str, instruction: str | None) -> Job:
    """Check one (image, instruction) pair: the image decodes and fits, and there is a plan or an instruction."""
    image = read_image(image_path, getattr(setup.spec, "max_aspect", None))
    plan = None
    if args.plan:
        plan = read_plan(args.plan, image.size)
    elif args.no_plan:
        instruction = check_instruction(instruction, "--no_plan needs --instruction: it becomes the global prompt")
        plan = RegionPlan(instruction, image_size=image.size)
    else:
        instruction = check_instruction(instruction, "pass --instruction (or --plan to execute a saved plan)")
    return Job(str(image_path), image, instruction, plan)


# ---------------------------------------------------------------------------------------------------- running
def load_pipeline(args, device: str, setup: Setup | None = None) -> RePlanPipeline:
    needs_planner = not (args.plan or args.no_plan)
    planner, planner_kwargs = None, {}
    if needs_planner:
        planner = setup.planner if setup is not None and setup.planner is not None else args.planner
        if isinstance(planner, str):
            template = setup.template if setup is not None else None
            if template is None and args.prompt_template:
                template = load_template(args.prompt_template)
            planner_kwargs = planner_options(args, template)
            if planner == "openai":
                planner_kwargs.update(endpoint(args))
    return RePlanPipeline.from_pretrained(
        backbone=args.backbone, planner=planner, model=args.model,
        vlm_ckpt_path=args.vlm_ckpt_path, lora_path=args.lora_path, vlm_lora_path=args.vlm_lora_path,
        device=device, torch_dtype=args.dtype,
        stage_offload=args.stage_offload, offload=args.offload, planner_kwargs=planner_kwargs,
        compile=args.compile, attention_budget=args.attention_budget,
        parallel=setup.parallel if setup is not None else parallel_config(args),
    )


def parallel_config(args):
    """The ``ContextParallelConfig`` for ``--ulysses N`` (None for one process)."""
    if args.ulysses < 1:
        raise ValueError(f"--ulysses must be >= 1, got {args.ulysses}")
    check_accel_parallel(args.accel, args.ulysses)
    if args.ulysses == 1:
        if args.ulysses_anything:
            raise ValueError("--ulysses_anything needs --ulysses N with N > 1")
        return None
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=args.ulysses, ulysses_anything=args.ulysses_anything)


def run_one(pipe: RePlanPipeline, args, job: Job, out_dir: Path) -> Path:
    """Plan (unless the job has a plan) and edit; write the outputs. Returns the folder written."""
    out = pipe(job.image, job.instruction, plan=job.plan, **edit_options(args))
    if not pipe.is_leader:  # another rank of the edit's group: the leader writes
        return out_dir
    note = no_regions_note(out.plan) if job.plan is None else None
    if note:
        print(f"warning: {note}; ran a global edit (use --parse strict to fail instead, or write a plan and "
              "pass --plan)", file=sys.stderr)
    planner = pipe.planner.provenance() if out.planner_text and pipe.planner is not None else None
    config = {
        "replan_version": __version__, "image": job.image_path, "instruction": job.instruction,
        "backbone": pipe.editor.spec.name, "model": args.model or pipe.editor.spec.model_id,
        "planner": None if job.plan is not None else args.planner, "vlm_ckpt_path": args.vlm_ckpt_path,
        "lora_path": args.lora_path, "vlm_lora_path": args.vlm_lora_path,
        "parse": None if job.plan is not None else parse_mode(args.parse, args.strict_plan),
        "plan_file": args.plan, "no_plan": args.no_plan, "planner_provenance": planner,
        "edit_options": {k: (v.describe() if k == "accel" else v) for k, v in edit_options(args).items()
                         if v is not None},
        "compile": args.compile, "attention_budget": args.attention_budget,
        "parallel": {"ulysses": args.ulysses, "ulysses_anything": args.ulysses_anything} if args.ulysses > 1 else None,
        "resolved": {"steps": pipe.editor.spec.steps if args.steps is None else args.steps,
                     "generation_size": out.edit.generation_size,
                     "boxes": [list(b) for b in out.edit.boxes],
                     "hint_padding": out.edit.extras.get("hint_padding", "as official")},
        "timings_s": {k: round(v, 3) for k, v in out.timings.items()},
        "accel": out.edit.extras.get("accel"),
        "replay": replay_command(args, job.image_path, pipe.editor.spec.name,
                                 trimmed="hint_padding" in out.edit.extras),
    }
    files = {"result.png": lambda p: out.image.save(p)}
    if not args.only_save_image:
        files["plan.json"] = lambda p: p.write_text(plan_json(out.plan, planner), encoding="utf-8")
        if job.plan is None:  # the planner ran: keep its reply verbatim
            files["planner_response.txt"] = lambda p: p.write_text(out.planner_text, encoding="utf-8")
        files["overlay.png"] = lambda p: out.overlay.save(p)
        files["config.json"] = lambda p: p.write_text(json.dumps(config, indent=2, default=str) + "\n")
    return write_outputs(out_dir, files)


def plan_json(plan: RegionPlan, planner: dict | None = None) -> str:
    """The plan file: the plan, plus under ``"planner"`` what produced it (template name and SHA-256, box frame,
    planner frame) when a planner did; ``RegionPlan.load`` reads it back either way."""
    data = plan.to_dict() | ({"planner": planner} if planner else {})
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def replay_command(args, image_path, backbone: str, trimmed: bool = False) -> str:
    """The command that re-runs this edit from the saved plan (same model, seed and every edit option; a hint padding
    trimmed to fit the attention budget is trimmed again)."""
    parts = ["python", "-m", "replan.infer", "--image", str(image_path), "--plan", "<this dir>/plan.json",
             "--backbone", backbone]
    if args.model:
        parts += ["--model", args.model]
    if args.lora_path:
        parts += ["--lora_path", args.lora_path]
    flags = {"steps": "--steps", "seed": "--seed", "expand": "--expand", "expand_mode": "--expand_mode",
             "switch": "--switch_ratio", "attention": "--attention", "guidance": "--guidance"}
    options = edit_options(args)
    if trimmed:
        options["trim_hint_padding"] = True
    for key, value in options.items():
        if key == "accel":
            parts += accel_flags(value)
        elif key == "trim_hint_padding":
            parts.append("--trim_hint_padding" if value else "--no-trim_hint_padding")
        elif value is not None:
            parts += [flags[key], str(value)]
    if args.compile:
        parts.append("--compile")
    return " ".join(shlex.quote(p) if p != "<this dir>/plan.json" else p for p in parts)


def output_error(e: OutputError) -> str:
    way_out = "copy it from there and rerun with a writable --output_dir" if e.saved_to else \
        "rerun with a writable --output_dir (or set REPLAN_RESCUE_DIR)"
    return f"error: {e}; {way_out}"


def interactive(pipe: RePlanPipeline, args, setup: Setup, out_root: Path) -> int:
    count, failures = 0, 0
    group = pipe.group if setup.parallel is not None else EditGroup.single()  # (one process: the pipe is not asked)
    leader = group.leader

    def ask(prompt: str) -> str:  # read on the leader; every rank of the edit gets the line
        def read():
            print(prompt, end="", file=sys.stderr, flush=True)
            return sys.stdin.readline()

        return group.on_leader(read)

    while True:
        image_path = ask("image path (EOF to quit): ")
        if not image_path:
            break
        image_path = image_path.strip()
        if not image_path:
            continue
        instruction = None
        if not args.plan:
            instruction = ask("instruction: ").strip()
        count += 1
        out_dir = out_root / f"{count:03d}_{Path(image_path).stem}"
        try:
            job = read_job(args, setup, image_path, instruction)  # checked before anything is planned
            run_one(pipe, args, job, out_dir)
            if leader:
                print(f"wrote {out_dir}", file=sys.stderr)
        except OutputError as e:
            failures += 1
            if leader:
                print(output_error(e), file=sys.stderr)
        except (ValueError, PlannerError) as e:
            failures += 1
            if leader:
                print(f"error: {e}", file=sys.stderr)
        except Exception as e:  # one failing edit must not end the session (and lose the loaded models)
            failures += 1
            logger.info("edit failed", exc_info=True)
            if leader:  # (every rank of an edit fails alike)
                print(f"error: the edit failed ({type(e).__name__}: {e}); -v shows the traceback", file=sys.stderr)
    if leader:
        print("", file=sys.stderr)
    return 0 if failures == 0 else 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    pipe = None
    try:
        setup = check_args(args)  # everything that can fail without a model fails here, in the first second
        pipe = load_pipeline(args, setup.device, setup)
        if args.image is None:
            return interactive(pipe, args, setup, Path(args.output_dir))
        out_dir = run_one(pipe, args, setup.job, Path(args.output_dir))
    except OutputError as e:
        print(output_error(e), file=sys.stderr)
        return 2
    except PlanParseError as e:
        return _fail(pipe, f"the planner reply does not follow the plan grammar: {e} (without --parse strict it "
                     "falls back to a global edit)", 2)
    except ValueError as e:
        return _fail(pipe, str(e), 2)
    except PlannerError as e:
        return _fail(pipe, f"planner failed: {e}", 3)
    finally:
        shutdown()
    if pipe.is_leader:
        print(f"wrote {out_dir}", file=sys.stderr)
    return 0


def _fail(pipe, message: str, code: int) -> int:
    if pipe is None or pipe.is_leader:  # every rank of an edit fails alike; one says so
        print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
