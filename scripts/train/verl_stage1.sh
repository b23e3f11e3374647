#!/usr/bin/env bash
# RePlan GRPO stage 1 (format & reasoning) with verl 0.9.1 on one node of 8 GPUs: configs/train/verl_stage1.yaml
# (the official hyper-parameters on top of verl's ppo_trainer.yaml). Any key=value argument overrides the config.
#
#   bash scripts/train/verl_stage1.sh                                   # 8 GPUs, Qwen/Qwen2.5-VL-7B-Instruct
#   bash scripts/train/verl_stage1.sh trainer.n_gpus_per_node=4 trainer.logger='[console,wandb]'
#
# Needs: a verl env (pip install -e '.[train-verl]', i.e. verl[vllm]==0.9.1, see docs/training.md) and the parquet
# files (python -m replan.train.data --split train|dev --out data/{train,dev}.parquet --format verl).
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
exec python3 -m verl.trainer.main_ppo --config-path "$PWD/configs/train" --config-name verl_stage1 \
  data.train_files="$(realpath "$TRAIN")" data.val_files="$(realpath "$VAL")" \
  trainer.default_local_dir="$PWD/checkpoints/replan/stage1" \
  "$@"
