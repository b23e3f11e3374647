"""Pre-flight of the verl launch scripts (``scripts/train/verl_stage*.sh``), run in the verl environment before Ray
starts, with the same config and overrides as the launch:

1. the packages verl's multimodal data path imports: ``qwen_vl_utils`` and ``torchvision``. Without them
   ``data.filter_overlong_prompts`` cannot measure a prompt and silently drops rows;
2. the data as verl will train on it: ``RLHFDataset`` over ``data.train_files`` / ``data.val_files`` with the run's
   ``data`` config and the model's processor — the row count before and after ``filter_overlong_prompts`` is printed,
   and fewer training rows than ``data.train_batch_size`` is an error (one line, exit 2).

    python -m replan.train.verl_check --config-name verl_stage1 data.train_files=/abs/train.parquet \\
        data.val_files=/abs/dev.parquet [key=value ...]

The install that provides everything (docs/training.md): ``pip install 'verl[vllm]==0.9.1'`` in its own
environment, then ``pip install --no-deps -e .`` for replan.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"
NEEDED = {"verl": "pip install 'verl[vllm]==0.9.1'",
          "qwen_vl_utils": "pip install qwen-vl-utils (part of verl[vllm]==0.9.1)",
          "torchvision": "install the torchvision that matches verl's torch (part of verl[vllm]==0.9.1)"}
INSTALL = "pip install 'verl[vllm]==0.9.1' && pip install --no-deps -e .   (docs/training.md §1)"


def missing_packages() -> list[str]:
    """The packages of ``NEEDED`` this environment cannot import."""
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def parquet_rows(files) -> int:
    import pyarrow.parquet as pq

    files = [files] if isinstance(files, str) else list(files)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def verdict(split: str, before: int, after: int, max_prompt_length: int, need: int) -> str:
    """The line printed for one split; ``ValueError`` when training could not use it."""
    line = (f"{split}: {after} of {before} rows remain after filter_overlong_prompts "
            f"(max_prompt_length={max_prompt_length})")
    if after == 0 or after < need:
        raise ValueError(f"{line}; {split} needs at least {need}: check the image resolution "
                         f"(model max_pixels), raise data.max_prompt_length, or rebuild the parquet "
                         f"(python -m replan.train.data ... --format verl)")
    return line


def compose(name: str, overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(config_name=name, overrides=list(overrides))


def check_data(cfg) -> list[str]:
    """Build verl's own ``RLHFDataset`` for both splits (this runs the real filter) and judge the sizes."""
    from transformers import AutoProcessor
    from verl.utils.dataset.rl_dataset import RLHFDataset

    processor = AutoProcessor.from_pretrained(cfg.actor_rollout_ref.model.path)
    lines = []
    for split, files, need in (("train", cfg.data.train_files, int(cfg.data.train_batch_size)),
                               ("val", cfg.data.val_files, 1)):
        before = parquet_rows(files)
        after = len(RLHFDataset(files, processor.tokenizer, config=cfg.data, processor=processor))
        lines.append(verdict(split, before, after, int(cfg.data.max_prompt_length), need))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replan.train.verl_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-name", default="verl_stage1", help="verl_stage1 or verl_stage2 (configs/train)")
    ap.add_argument("overrides", nargs="*", help="the launch's key=value overrides")
    args = ap.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"error: the verl environment lacks {', '.join(missing)} (verl's multimodal data path and "
              f"filter_overlong_prompts need them): {INSTALL}", file=sys.stderr)
        return 2
    try:
        for line in check_data(compose(args.config_name, args.overrides)):
            print(line)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
