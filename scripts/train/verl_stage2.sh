#!/usr/bin/env bash
# RePlan GRPO stage 2 (planning) with verl 0.9.1 on one node of 8 GPUs: configs/train/verl_stage2.yaml. Starts from the
# merged stage-1 model (scripts/train/merge.sh) and scores plans with the edit server and a VLM judge, which must be
# running already (the reward waits for both, up to reward_kwargs.ready_timeout seconds, then stops the run).
#
#   EDIT_URL=http://10.0.0.2:8001 JUDGE_URL=http://10.0.0.3:8000/v1 bash scripts/train/verl_stage2.sh
#   bash scripts/train/verl_stage2.sh actor_rollout_ref.model.path=/ckpt/stage1_hf
#
# Environment: the verl one of verl_stage1.sh (pip install 'verl[vllm]==0.9.1' first, then pip install --no-deps -e .).
# Data: python -m replan.train.data --split train|dev --stage 2 --out data/{train,dev}_stage2.parquet --format verl
# (stage-2 rows keep the raw images beside the parquet, in data/{train,dev}_stage2.images/: the reward's fallback
# when verl does not hand them over).
# Before Ray starts, python -m replan.train.verl_check checks qwen_vl_utils/torchvision and prints the dataset sizes
# after filter_overlong_prompts (too few rows stops here; REPLAN_SKIP_PREFLIGHT=1 skips the check).
set -euo pipefail
cd "$(dirname "$0")/../.."

EDIT_URL=${EDIT_URL:-http://127.0.0.1:8001}
JUDGE_URL=${JUDGE_URL:-http://127.0.0.1:8000/v1}
JUDGE_MODEL=${JUDGE_MODEL:-Qwen/Qwen2.5-VL-72B-Instruct}
STAGE1_HF=${STAGE1_HF:-checkpoints/replan/stage1_hf}

TRAIN=${TRAIN:-data/train_stage2.parquet}
VAL=${VAL:-data/dev_stage2.parquet}
for f in "$TRAIN" "$VAL"; do
  [[ -f $f ]] || { echo "error: $f is missing: python -m replan.train.data --split train|dev --stage 2 --out $f" >&2
                   exit 2; }
done
[[ -f $STAGE1_HF/config.json ]] || { echo "error: $STAGE1_HF is not a merged model: run scripts/train/merge.sh" >&2; exit 2; }

export TOKENIZERS_PARALLELISM=true NCCL_DEBUG=WARN VLLM_LOGGING_LEVEL=WARN PYTHONUNBUFFERED=1
# absolute paths: Ray workers need not share this working directory
ARGS=(data.train_files="$(realpath "$TRAIN")" data.val_files="$(realpath "$VAL")"
      trainer.default_local_dir="$PWD/checkpoints/replan/stage2"
      actor_rollout_ref.model.path="$(realpath "$STAGE1_HF")"
      reward.custom_reward_function.reward_kwargs.edit_url="$EDIT_URL"
      reward.custom_reward_function.reward_kwargs.judge_url="$JUDGE_URL"
      reward.custom_reward_function.reward_kwargs.judge_model="$JUDGE_MODEL" "$@")
[[ ${REPLAN_SKIP_PREFLIGHT:-0} == 1 ]] || python3 -m replan.train.verl_check --config-name verl_stage2 "${ARGS[@]}"
exec python3 -m verl.trainer.main_ppo --config-path "$PWD/configs/train" --config-name verl_stage2 "${ARGS[@]}"
