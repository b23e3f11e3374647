"""GRPO training of the planner on one machine with TRL's ``GRPOTrainer`` (stage 1: format, stage 2: planning).

    python -m replan.train.grpo --config configs/train/stage1.yaml [key=value ...]
    python -m replan.train.grpo --config configs/train/stage2.yaml model.path=outputs/train/stage1 \\
        reward.edit_url=http://127.0.0.1:8001 reward.judge_url=http://127.0.0.1:8000/v1

The YAML holds the official hyper-parameters (spec §5.3); ``key=value`` overrides change single fields, e.g.
``grpo.max_steps=2`` or ``data.dataset=tiny``. The ``grpo`` section goes to ``trl.GRPOConfig`` as is (any of its
fields); ``prompts_per_step`` (16) sets the gradient accumulation so that one optimiser step sees
``prompts_per_step × num_generations`` completions, as official (one update per rollout step).

* The prompt is the planner's inference prompt (image first, then template + instruction): ``replan.train.data``.
* Stage 1 reward: ``replan.train.rewards.stage1_rewards`` (format/quality/region). Stage 2: ``replan.train.remote.
  Stage2Reward`` (edit server + VLM judge); both servers must answer ready before the model is even loaded.
* Checkpoints are Hugging Face model directories (``<output_dir>/checkpoint-<step>``, the final model in
  ``output_dir``; with LoRA the adapter there and the merged model in ``output_dir/merged``, merged into a copy loaded
  from disk so the trainer keeps its adapter). ``resume: auto`` continues from the last checkpoint after a crash.
* The output folder records the run's settings (``run_config.json``, as eval generation does); a run with other
  settings, or a fresh start (``resume=never``) over its checkpoints, is refused: a smoke run never continues a real
  one, and the other way round (``configs/train/tiny.yaml`` writes to ``outputs/train/tiny``).

Errors in the configuration (unknown keys, a missing dataset column, a model path that is not a model, unreachable
reward servers) are one line on stderr and exit status 2, before any training.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import yaml

from replan.train.config import (  # noqa: F401  (re-exported: the configuration API of a run)
    CONFIG_FILE,
    DEFAULT_MODEL,
    REPORT_TO,
    LoraSection,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    report_targets,
    run_settings,
    validate,
)
from replan.train.loading import (  # noqa: F401  (re-exported)
    build_dataset,
    load_model,
    merged_copy,
    peft_config,
    prompt_lengths,
    resolve_model_path,
)

logger = logging.getLogger("replan.train.grpo")




# ---------------------------------------------------------------------------------------------------- rewards
def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:  # conversational: [{"role": "assistant", "content": ...}]
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return ""


def _log_means(log_metric, results: list[dict], prefix: str) -> None:
    if log_metric is None or not results:
        return
    for key in results[0]:
        values = [r.get(key) for r in results]
        numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(float(v))]
        bools = [float(v) for v in values if isinstance(v, bool)]
        if numbers or bools:
            vals = numbers or bools
            log_metric(f"{prefix}/{key}", sum(vals) / len(vals))


class Stage1Reward:
    """TRL reward function: the stage-1 format score (``overall``) of each completion; sub-scores are logged."""

    __name__ = "replan_format"

    def __call__(self, prompts, completions, completion_ids=None, log_metric=None, **_):
        from replan.train.rewards import stage1_rewards

        results = stage1_rewards([_text(c) for c in completions])
        _log_means(log_metric, results, "stage1")
        return [float(r["overall"]) for r in results]


def planner_frame(processor, image) -> tuple[int, int]:
    """(W, H) of the frame the policy sees ``image`` in: the processor's ``image_grid_thw`` × its patch size, exactly
    what the trainer feeds the model (and what inference maps boxes from)."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    _, grid_h, grid_w = (int(v) for v in out["image_grid_thw"][0])
    patch = int(getattr(processor.image_processor, "patch_size", 14))
    return (grid_w * patch, grid_h * patch)


class Stage2RewardFn:
    """TRL reward function: ``Stage2Reward`` (edit server + judge) on each completion; sub-scores are logged. With a
    ``processor`` each sample carries the planner frame from ``image_grid_thw`` (``box_frame="processor"``)."""

    __name__ = "replan_planning"

    def __init__(self, reward, processor=None):
        self.reward, self.processor = reward, processor

    def __call__(self, prompts, completions, completion_ids=None, image=None, instruction=None,
                 referring_expression=None, log_metric=None, **_):
        from replan.images import to_rgb

        n = len(completions)
        images = [to_rgb(im) if im is not None else None for im in (image if image is not None else [None] * n)]
        frames: dict[int, tuple[int, int]] = {}  # the 8 completions of a prompt share one image
        if self.processor is not None and getattr(self.reward, "box_frame", "original") == "processor":
            for im in images:
                if im is not None and id(im) not in frames:
                    frames[id(im)] = planner_frame(self.processor, im)
        samples = [{"image": images[i], "instruction": (instruction or [""] * n)[i],
                    "referring_expression": (referring_expression or [""] * n)[i],
                    "response": _text(completions[i]), "planner_size": frames.get(id(images[i]))} for i in range(n)]
        results = self.reward(samples)
        _log_means(log_metric, results, "stage2")
        return [float(r["overall"]) for r in results]


def build_stage2_reward(cfg: TrainConfig):
    """The stage-2 reward, once both servers answered ready within ``reward.ready_timeout`` seconds (one-line
    ``ValueError`` otherwise)."""
    import asyncio

    from replan.train.remote import RewardConfig

    try:
        reward_cfg = RewardConfig.from_dict(dict(cfg.reward))
        reward = reward_cfg.build()
    except (TypeError, ValueError) as e:  # incl. JudgeConfigError (no judge model)
        raise ValueError(f"reward: {' '.join(str(e).split())}") from None
    logger.info("waiting up to %g s for the edit server (%s) and the judge (%s, %s)", reward_cfg.ready_timeout,
                reward_cfg.edit_url, reward_cfg.judge_url, reward_cfg.judge_model)
    try:
        asyncio.run(reward.wait_ready(reward_cfg.ready_timeout))
    except Exception as e:  # noqa: BLE001 - never ready, failed to load, wrong URL/key/model: stop before training
        reward.close()
        raise ValueError(f"stage-2 reward servers not usable: {' '.join(str(e).split()) or type(e).__name__}") from None
    return reward


# ---------------------------------------------------------------------------------------------------- trainer
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def grpo_args(cfg: TrainConfig):
    """``trl.GRPOConfig`` from the ``grpo`` section plus our own keys (batch arithmetic, logging, output)."""
    from trl import GRPOConfig

    grpo = dict(cfg.grpo)
    g = int(grpo.get("num_generations", 8))
    per_device = int(grpo.get("per_device_train_batch_size", 8))
    completions = cfg.prompts_per_step * g
    world = world_size()
    if completions % (per_device * world):
        raise ValueError(f"prompts_per_step × num_generations = {completions} must be divisible by "
                         f"per_device_train_batch_size × processes = {per_device} × {world}")
    grpo.setdefault("num_generations", g)
    grpo["per_device_train_batch_size"] = per_device
    report_to = report_targets(cfg.report_to)
    for backend in report_to:
        if backend != "none":
            try:
                __import__("torch.utils.tensorboard" if backend == "tensorboard" else "wandb")
            except ImportError:
                raise ValueError(f"report_to={backend} needs the {backend} package: pip install {backend} "
                                 f"(or report_to=none)") from None
    if not _cuda():  # CPU (smoke runs, CI): fp32, no bf16 autocast
        grpo.setdefault("use_cpu", True)
        grpo["bf16"] = False
    try:
        return GRPOConfig(output_dir=cfg.output_dir, report_to=report_to, remove_unused_columns=False,
                          gradient_accumulation_steps=completions // (per_device * world), **grpo)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grpo: {' '.join(str(e).split())}") from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resume_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from: ``auto`` → the last ``checkpoint-<k>`` in ``output_dir`` (None if none)."""
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        out = Path(cfg.output_dir)
        return get_last_checkpoint(str(out)) if out.is_dir() else None
    p = Path(cfg.resume).expanduser()
    if not (p / "trainer_state.json").is_file():
        raise ValueError(f"resume: {p} is not a trainer checkpoint (no trainer_state.json); use auto, never or a "
                         f"{cfg.output_dir}/checkpoint-<step> directory")
    return str(p)


def prepare(cfg: TrainConfig) -> dict:
    """Everything checked and built before the trainer: one-line ``ValueError`` for any configuration problem."""
    from replan.planner.base import load_template
    from replan.train.data import open_split

    cfg.model.path = resolve_model_path(cfg.model.path)
    load_template(cfg.data.template)
    open_split(cfg.data)  # columns checked before the model is loaded
    args = grpo_args(cfg)
    checkpoint = resume_checkpoint(cfg)
    lora = peft_config(cfg.lora)
    reward_fn = Stage2RewardFn(build_stage2_reward(cfg)) if cfg.stage == 2 else Stage1Reward()
    return {"args": args, "checkpoint": checkpoint, "peft_config": lora, "reward_fn": reward_fn}


def trainer_class():
    """``GRPOTrainer`` with a resume that restores full-model weights through ``from_pretrained``.

    transformers 5 saves Qwen2.5-VL checkpoints with the original key names (``visual.*``, ``model.layers.*``) and
    renames them only in ``from_pretrained``; ``Trainer._load_from_checkpoint`` loads ``model.safetensors`` with a
    non-strict ``load_state_dict``, which then matches no key and silently resumes from the initial weights.
    """
    from trl import GRPOTrainer

    class ReplanGRPOTrainer(GRPOTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = self.model if model is None else model
            plain = not (self.is_fsdp_enabled or self.is_deepspeed_enabled or hasattr(target, "peft_config"))
            if not plain or not (Path(resume_from_checkpoint) / "config.json").is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
            result = target.load_state_dict(loaded.state_dict(), strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the model: missing "
                                   f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
            logger.info("model weights restored from %s", resume_from_checkpoint)

    return ReplanGRPOTrainer


def build_trainer(cfg: TrainConfig, callbacks=None, extra_rewards=None):
    """``(trainer, checkpoint to resume from or None)``; every configuration problem is a one-line ``ValueError``
    raised here, before the model is trained. ``extra_rewards``: more TRL reward functions, added to the stage's
    reward (e.g. a dense shaping reward for smoke tests; never part of the official recipe)."""
    from replan import __version__
    from replan.config_io import check_run_settings, record_run_settings

    out = Path(cfg.output_dir)
    settings = run_settings(cfg)  # before prepare() resolves model.path
    recorded = check_run_settings(out, settings, way_out="resume it with its own config, or use another output_dir")
    prep = prepare(cfg)
    if prep["checkpoint"] is None and cfg.resume == "never" and out.is_dir() and any(out.glob("checkpoint-*")):
        raise ValueError(f"{out} holds checkpoints of a run and resume=never would overwrite them: resume=auto "
                         f"continues it, or use another output_dir")
    model, processor = load_model(cfg.model)
    if isinstance(prep["reward_fn"], Stage2RewardFn):
        prep["reward_fn"].processor = processor  # the planner frame of each sample comes from image_grid_thw
    dataset = build_dataset(cfg, processor)
    out.mkdir(parents=True, exist_ok=True)
    if not recorded:
        record_run_settings(out, settings, replan_version=__version__)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    logger.info("stage %d: %d prompts, %d prompts x %d generations per step, %s steps, resume from %s",
                cfg.stage, len(dataset), cfg.prompts_per_step, prep["args"].num_generations, prep["args"].max_steps,
                prep["checkpoint"] or "scratch")
    try:
        trainer = trainer_class()(
            model=model, reward_funcs=[prep["reward_fn"], *(extra_rewards or [])], args=prep["args"],
            train_dataset=dataset, processing_class=processor, peft_config=prep["peft_config"], callbacks=callbacks)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot set up GRPO: {' '.join(str(e).split())}") from None
    trainer.replan_lora = prep["peft_config"] is not None
    trainer.replan_processor = processor
    trainer.replan_base = cfg.model.path
    return trainer, prep["checkpoint"]


def run(trainer, checkpoint: str | None, output_dir: str | Path):
    """Train (resuming from ``checkpoint`` if given) and save the final model in ``output_dir``."""
    trainer.train(resume_from_checkpoint=checkpoint)
    save_final(trainer, trainer.replan_processor, Path(output_dir), lora=trainer.replan_lora,
               base=getattr(trainer, "replan_base", None))
    return trainer


def train(cfg: TrainConfig, callbacks=None, extra_rewards=None):
    """Run GRPO; return the trainer (its ``state.log_history`` holds the logged rewards)."""
    trainer, checkpoint = build_trainer(cfg, callbacks, extra_rewards)
    return run(trainer, checkpoint, cfg.output_dir)


def save_final(trainer, processor, out: Path, lora: bool, base: str | None = None) -> None:
    """The final model in ``out``; with LoRA the adapter there and a merged Hugging Face model in ``out/merged``,
    merged into a copy (``merged_copy``): the trainer keeps its adapter and can go on training or saving."""
    trainer.save_model(str(out))
    processor.save_pretrained(str(out))
    if lora and trainer.is_world_process_zero():  # a merged HF model for stage 2 / inference in out/merged
        merged = merged_copy(trainer.model, out, base)
        merged.save_pretrained(str(out / "merged"))
        processor.save_pretrained(str(out / "merged"))
        del merged
    logger.info("saved the final model to %s%s", out, " (merged: merged/)" if lora else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replan.train.grpo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/train/stage1.yaml or stage2.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. grpo.max_steps=2 model.path=tiny")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        trainer, checkpoint = build_trainer(cfg)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    run(trainer, checkpoint, cfg.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
