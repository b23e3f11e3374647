"""IV-Edit generation (evaluation step 1): RePlan or a baseline over a dataset split, one folder per sample.

    python -m replan.eval.generate --config configs/eval/replan_flux_kontext.yaml
    python -m replan.eval.generate --config configs/eval/baseline_qwenimageedit.yaml --rank 1 --world 4
    python -m replan.eval.generate --config configs/eval/tiny.yaml --limit 3 steps=2 output_dir=outputs/eval/smoke
    bash scripts/eval/generate.sh configs/eval/replan_flux_kontext.yaml 8          # one process per GPU

Methods (``method:`` in the config):

* ``replan``   — the planner plans, the backbone executes the plan with region attention (official eval settings:
  the backbone's ``eval`` switch/expand unless the config sets them);
* ``baseline`` — the stock backbone with the raw instruction (a plan without regions runs exactly the stock pipeline);
* ``rephrase`` — the planner VLM rewrites the instruction **text-only** (no image, as the official baseline) with
  ``REPHRASE_TEMPLATE`` (or ``rephrase_template:``), then the stock backbone edits with the rewrite; when the
  rewrite fails or is empty the original instruction is used and the reason is recorded in ``config.json``.

Layout: ``<output_dir>/run_config.json`` (written once; a later run whose generation settings differ refuses unless
``--force``), and per sample ``<output_dir>/<image_id>/`` with ``result.png``, ``plan.json``, ``config.json`` and
``planner_response.txt`` (``replan``/``rephrase``). Files are written to a temporary folder and moved in with
``result.png`` last, so a sample counts as finished only when all of it is there; finished samples are skipped on a
re-run. A failing sample (planner error, invalid plan, editor exception) gets ``error.txt`` instead of ``result.png``
and the run goes on; a re-run retries it.

Determinism: sample ``image_id`` uses seed ``seed + int(image_id)`` (numeric ids) or ``seed + crc32(image_id)``, so
its image does not depend on sharding, order or resumption. (Official: one generator seeded ``seed + rank`` and
reused across the shard, so results depend on the GPU count.)

Sharding: ``--rank R --world W`` (default from ``RANK``/``WORLD_SIZE`` or ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``, as set
by ``torchrun``/``accelerate launch``) processes ``samples[R::W]`` after ``limit``.

Several GPUs per sample: ``ulysses: N`` (Ulysses context parallelism, docs/parallel.md) under
``torchrun --nproc_per_node G`` splits the G ranks into G/N groups; each group computes one sample at a time on its N
GPUs, the groups are the shards (``samples[g::G/N]``), and each group's first rank plans and writes.

Overrides: trailing ``key=value`` pairs (YAML values; dotted keys for the planner, e.g. ``planner.ckpt=tiny``).
Exit codes: 0 every sample finished, 1 some samples failed (see their ``error.txt``), 2 bad config or refused run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from replan import __version__
from replan.distributed import EditGroup, shutdown
from replan.eval.gen_config import (  # noqa: F401  (re-exported: the public names of a generation run)
    ERROR,
    METHODS,
    REPHRASE_TEMPLATE,
    RESULT,
    RUN_CONFIG,
    GenerateConfig,
    PlannerConfig,
    _clean_stale_tmp,
    _read,
    _sha256,
    apply_overrides,
    check_run_config,
    config_from_dict,
    default_device,
    dist_env,
    finished_ids,
    load_config,
    planner_parse,
    resolved_settings,
    sample_seed,
    validate,
)
from replan.infer import plan_json
from replan.io import check_writable, write_atomically

logger = logging.getLogger("replan.eval.generate")


# ---------------------------------------------------------------------------------------------------- rephrase
def clean_rephrase(text: str) -> str:
    """Strip whitespace and one pair of enclosing quotes from a rewrite."""
    text = (text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


# ---------------------------------------------------------------------------------------------------- generation
@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    no_regions: int = 0  # replan samples whose plan had no regions (the edit ran globally)
    fallbacks: int = 0  # rephrase samples that used the original instruction
    failed_ids: list = field(default_factory=list)
    shard: str = "0/1"
    writer: bool = True  # False on the ranks of a context-parallel group that compute but do not write

    def line(self, shard: str, out: Path) -> str:
        extra = ""
        if self.no_regions:
            extra += f"; {self.no_regions} plan(s) without regions ran as global edits"
        if self.fallbacks:
            extra += f"; {self.fallbacks} rephrase fallback(s) to the original instruction"
        return (f"generate: {self.done} done, {self.skipped} skipped, {self.failed} failed "
                f"(of {self.total} in shard {shard}){extra} -> {out}")


class Generator:
    """Runs one config's method on samples with a loaded ``RePlanPipeline``."""

    def __init__(self, cfg: GenerateConfig, pipe, settings: dict | None = None):
        self.cfg = cfg
        self.pipe = pipe
        self.settings = settings or resolved_settings(cfg)
        self.rephrase_template = _read(cfg.rephrase_template, REPHRASE_TEMPLATE)
        self.group = getattr(pipe, "group", None) or EditGroup.single()  # several ranks per sample: the leader writes

    def write(self, sample_dir: Path, files: dict, drop_result: bool = False) -> None:
        if self.group.leader:
            if drop_result:  # a --force re-run must not leave an old result behind
                (sample_dir / RESULT).unlink(missing_ok=True)
            write_atomically(sample_dir, files)

    def edit_options(self, seed: int) -> dict:
        s = self.settings
        options = {"steps": s["steps"], "seed": seed, "expand": s["expand"], "expand_mode": s["expand_mode"],
                   "switch": s["switch"], "attention": s["attention"], "entry": "eval"}
        if s["guidance"] is not None:
            options["guidance"] = s["guidance"]
        if s.get("accel") is not None:
            options["accel"] = s["accel"]
        return options

    def run_sample(self, sample, sample_dir: Path) -> dict:
        """Generate one sample into ``sample_dir``; raises on failure (after saving what exists)."""
        import torch

        from replan.plan import RegionPlan

        cfg = self.cfg
        seed = sample_seed(cfg.seed, sample.image_id)
        torch.manual_seed(seed)  # anything drawing on the global RNG (a sampling planner) is per-sample too
        image = sample.image
        record = {"replan_version": __version__, "method": cfg.method, "image_id": sample.image_id,
                  "instruction": sample.instruction, "referring_expression": sample.referring_expression,
                  "image_size": list(image.size), "seed": seed, "settings": self.settings}
        files, timings, planner_text = {}, {}, None
        start = time.perf_counter()
        stage = "plan"
        try:
            if cfg.method == "replan":
                plan, planner_text = self.pipe.plan(image, sample.instruction)  # the planner's parse mode
                timings["plan"] = time.perf_counter() - start
                if self.group.leader:  # the planner lives on the leader of a context-parallel group
                    reply = getattr(self.pipe.planner, "last_reply", None)
                    if reply is not None:
                        record["planner_reply"] = {"frame": list(reply.frame), **reply.extras}
                    record["planner_provenance"] = self.pipe.planner.provenance()
                files["plan.json"] = lambda p, plan=plan: p.write_text(
                    plan_json(plan, record.get("planner_provenance")), encoding="utf-8")
            elif cfg.method == "rephrase":
                stage = "rephrase"
                prompt, planner_text, record["rephrase"] = self.group.on_leader(self.rephrase, sample.instruction)
                timings["rephrase"] = time.perf_counter() - start
                plan = RegionPlan(prompt, image_size=image.size)
            else:
                plan = RegionPlan(sample.instruction, image_size=image.size)
            if planner_text is not None:
                files["planner_response.txt"] = lambda p, t=planner_text: p.write_text(t, encoding="utf-8")
            record["plan"] = {"global_prompt": plan.global_prompt, "regions": len(plan.regions),
                              "repairs": list(plan.repairs)}
            stage = "edit"
            t = time.perf_counter()
            out = self.pipe(image, plan=plan, **self.edit_options(seed))
            timings["edit"] = time.perf_counter() - t
        except Exception as e:
            record["error"] = {"stage": stage, "type": type(e).__name__, "message": str(e)}
            error = f"{stage} failed: {type(e).__name__}: {e}\n\n{traceback.format_exc()}"
            files["config.json"] = lambda p: p.write_text(json.dumps(record, indent=2, default=str) + "\n")
            files[ERROR] = lambda p: p.write_text(error, encoding="utf-8")
            self.write(sample_dir, files, drop_result=True)
            raise
        timings["total"] = time.perf_counter() - start
        record["edit"] = {"generation_size": list(out.edit.generation_size),
                          "boxes": [[float(v) for v in b] for b in out.edit.boxes]}
        if "hint_padding" in out.edit.extras:  # trimmed to fit the attention budget
            record["edit"]["hint_padding"] = out.edit.extras["hint_padding"]
        record["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        if out.edit.extras.get("accel"):
            record["accel"] = out.edit.extras["accel"]
        files["plan.json"] = lambda p, plan=out.plan: p.write_text(plan_json(plan, record.get("planner_provenance")),
                                                                    encoding="utf-8")
        files["config.json"] = lambda p: p.write_text(json.dumps(record, indent=2, default=str) + "\n")
        files[RESULT] = lambda p: out.image.save(p)  # last: its presence means the sample is complete
        self.write(sample_dir, files)
        if self.group.leader:
            (sample_dir / ERROR).unlink(missing_ok=True)
        return record

    def rephrase(self, instruction: str) -> tuple[str, str, dict]:
        """(prompt for the editor, raw reply, record). Falls back to the instruction on any failure."""
        from replan.planner import build_prompt

        info = {"template_sha256": _sha256(self.rephrase_template)}
        try:
            self.pipe._activate("plan")
            reply = self.pipe.planner.generate_text(build_prompt(self.rephrase_template, instruction))
        except Exception as e:  # the official baseline falls back on any exception, too
            logger.warning("rephrase failed (%s: %s); using the original instruction", type(e).__name__, e)
            info.update(fallback=True, reason=f"{type(e).__name__}: {e}", rephrased=None)
            return instruction, "", info
        text = clean_rephrase(reply)
        if not text:
            info.update(fallback=True, reason="empty rewrite", rephrased=None)
            return instruction, reply, info
        info.update(fallback=False, rephrased=text)
        return text, reply, info


def load_pipeline(cfg: GenerateConfig, device: str):
    from replan.pipeline import RePlanPipeline
    from replan.planner import load_template

    planner = None
    kwargs = {}
    if cfg.method != "baseline":
        planner = cfg.planner.kind
        if cfg.planner.kind == "openai":
            kwargs = {k: v for k, v in (("base_url", cfg.planner.base_url),) if v}
            kwargs["max_retries"] = cfg.planner.max_retries
            if cfg.planner.max_new_tokens:
                kwargs["max_tokens"] = cfg.planner.max_new_tokens
        elif cfg.planner.max_new_tokens:
            kwargs["max_new_tokens"] = cfg.planner.max_new_tokens
        if cfg.method == "replan":
            kwargs["box_frame"] = cfg.planner.box_frame
            kwargs["parse"] = planner_parse(cfg)
            if cfg.planner.template:
                kwargs["template"] = load_template(cfg.planner.template)
                kwargs["template_name"] = cfg.planner.template
    pipe = RePlanPipeline.from_pretrained(
        backbone=cfg.backbone, planner=planner, model=cfg.model, vlm_ckpt_path=cfg.planner.ckpt,
        lora_path=cfg.lora_path, vlm_lora_path=cfg.planner.vlm_lora_path, device=device, torch_dtype=cfg.dtype,
        stage_offload=cfg.stage_offload, planner_kwargs=kwargs, compile=cfg.compile,
        attention_budget=cfg.attention_budget, parallel=_parallel(cfg),
    )
    if hasattr(pipe.editor.pipe, "set_progress_bar_config"):
        pipe.editor.pipe.set_progress_bar_config(disable=True)  # one bar per run, not one per sample
    return pipe


def _parallel(cfg: GenerateConfig):
    if cfg.ulysses == 1:
        return None
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=cfg.ulysses, ulysses_anything=cfg.ulysses_anything)


def run(cfg: GenerateConfig, rank: int = 0, world: int = 1, force: bool = False, pipe=None) -> Summary:
    """Generate shard ``rank`` of ``world``; returns the counts. ``pipe``: an already loaded pipeline (optional).

    With ``cfg.ulysses > 1`` every torchrun rank calls this: all load the pipeline (a collective), the groups are the
    shards (``rank``/``world`` are replaced by the group's), and each group's leader decides and writes."""
    from tqdm import tqdm

    from replan.eval.dataset import load_samples

    if cfg.ulysses > 1:
        pipe = pipe or load_pipeline(cfg, cfg.device)
        rank, world = pipe.group.index, pipe.group.count
    group = getattr(pipe, "group", None) or EditGroup.single()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank} and world {world}")
    out = Path(cfg.output_dir)
    check_writable(out, "output_dir")
    settings = resolved_settings(cfg)
    group.on_leader(check_run_config, out, cfg, settings, force)
    samples = load_samples(cfg.dataset, cfg.split, cfg.limit, rank, world)
    summary = Summary(total=len(samples), shard=f"{rank}/{world}", writer=group.leader)
    done = group.on_leader(finished_ids, out, samples, force)  # the group agrees on what is left
    todo = [s for s in samples if s.image_id not in done]
    summary.skipped = len(samples) - len(todo)
    if todo and pipe is None:
        pipe = load_pipeline(cfg, cfg.device or default_device())
    generator = Generator(cfg, pipe, settings) if todo else None
    bar = tqdm(todo, desc=f"{cfg.method}:{Path(cfg.output_dir).name} [{rank}/{world}]", file=sys.stderr,
               position=rank if world > 1 and sys.stderr.isatty() else None, dynamic_ncols=True,
               disable=not group.leader)
    for sample in bar:
        sample_dir = out / sample.image_id
        try:
            record = generator.run_sample(sample, sample_dir)
        except Exception as e:  # recorded in error.txt; the run goes on
            summary.failed += 1
            summary.failed_ids.append(sample.image_id)
            logger.error("sample %s failed: %s: %s", sample.image_id, type(e).__name__, e)
            _empty_cache()
            continue
        summary.done += 1
        if cfg.method == "replan" and not record["plan"]["regions"]:
            summary.no_regions += 1
        if cfg.method == "rephrase" and record["rephrase"]["fallback"]:
            summary.fallbacks += 1
        bar.set_postfix(done=summary.done, failed=summary.failed)
    bar.close()
    return summary


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.eval.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a YAML from configs/eval/")
    ap.add_argument("--rank", "--rank_id", dest="rank", type=int, default=None,
                    help="shard index (default: $RANK or $LOCAL_RANK, else 0)")
    ap.add_argument("--world", "--world_size", dest="world", type=int, default=None,
                    help="number of shards (default: $WORLD_SIZE or $LOCAL_WORLD_SIZE, else 1)")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of the split (overrides the config)")
    ap.add_argument("--force", action="store_true",
                    help="regenerate every sample, even over a run made with other settings")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. steps=4 planner.ckpt=tiny)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    env_rank, env_world = dist_env()
    rank = args.rank if args.rank is not None else (env_rank or 0)
    world = args.world if args.world is not None else (env_world or 1)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.limit is not None:
            cfg.limit = args.limit
            validate(cfg)
        summary = run(cfg, rank, world, args.force)
    except (ValueError, OSError, ImportError) as e:  # OSError: e.g. the hub is unreachable and there is no copy
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if summary.writer:
        print(summary.line(summary.shard, Path(cfg.output_dir)), file=sys.stderr)
    if summary.failed and summary.writer:
        print(f"failed samples (see <id>/{ERROR}): {', '.join(summary.failed_ids)}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
