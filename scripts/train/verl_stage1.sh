#!/usr/bin/env bash
# RePlan GRPO stage 1 (format & reasoning) with verl 0.9.1 on one node of 8 GPUs: configs/train/verl_stage1.yaml
# (the official hyper-parameters on top of verl's ppo_trainer.yaml). Any key=value argument overrides the config.
#
#   bash scripts/train/verl_stage1.sh                                   # 8 GPUs, Qwen/Qwen2.5-VL-7B-Instruct
#   bash scripts/train/verl_stage1.sh trainer.n_gpus_per_node=4 trainer.logger='[console,wandb]'
#
# Needs its own verl environment (docs/training.md §1; verl pins transformers<5.11, replan's own env has 5.2x):
#   python -m venv .venv-verl && . .venv-verl/bin/activate
#   pip install 'verl[vllm]==0.9.1'     # first: torch 2.11, vLLM 0.24, transformers 5.9, qwen-vl-utils, torchvision
#   pip install --no-deps -e .          # then replan's code only (the reward function and the data converter)
# and the parquet files (python -m replan.train.data --split train|dev --out data/{train,dev}.parquet --format verl).
# Before Ray starts, python -m replan.train.verl_check checks qwen_vl_utils/torchvision and prints the dataset sizes
# after filter_overlong_prompts (too few rows stops here; REPLAN_SKIP_PREFLIGHT=1 skips the check).
# Checkpoints: checkpoints/replan/stage1/global_step_<k>/actor (merge them with scripts/train/merge.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

TRAIN=${TRAIN:-data/train.parquet}
VAL=${VAL:-data/dev.parquet}
for f in "$TRAIN" "$VAL"; do
  [[ -f $f ]] || { echo "error: $f is missing: python -m replan.train.data --split train|dev --out $f --format verl" >&2
                   exit 2; }
done

export TOKENIZERS_PARALLELISM=true NCCL_DEBUG=WARN VLLM_LOGGING_LEVEL=WARN PYTHONUNBUFFERED=1
# absolute paths: Ray workers need not share this working directory
ARGS=(data.train_files="$(realpath "$TRAIN")" data.val_files="$(realpath "$VAL")"
      trainer.default_local_dir="$PWD/checkpoints/replan/stage1" "$@")
[[ ${REPLAN_SKIP_PREFLIGHT:-0} == 1 ]] || python3 -m replan.train.verl_check --config-name verl_stage1 "${ARGS[@]}"
exec python3 -m verl.trainer.main_ppo --config-path "$PWD/configs/train" --config-name verl_stage1 "${ARGS[@]}"
