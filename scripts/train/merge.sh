#!/usr/bin/env bash
# Stage 1 -> stage 2: merge a verl FSDP actor checkpoint into a Hugging Face model directory with verl's own merger.
#
#   bash scripts/train/merge.sh [ACTOR_DIR] [HF_OUT]
#   bash scripts/train/merge.sh checkpoints/replan/stage1/global_step_30/actor checkpoints/replan/stage1_hf
#
# ACTOR_DIR holds model_world_size_<W>_rank_<r>.pt shards, fsdp_config.json and huggingface/ (config, tokenizer).
# The merged weights are bf16. The merger re-saves the processor only when AutoProcessor can load huggingface/; if it
# did not, the processor and tokenizer files are copied from huggingface/ (else from BASE_MODEL, a local Qwen2.5-VL
# directory).
# The result is what stage 2 (verl_stage2.sh, or TRL: model.path=...) and the planner (--vlm_ckpt_path) load.
set -euo pipefail
cd "$(dirname "$0")/../.."

ACTOR_DIR=${1:-checkpoints/replan/stage1/global_step_30/actor}
HF_OUT=${2:-checkpoints/replan/stage1_hf}
[[ -f $ACTOR_DIR/fsdp_config.json ]] || { echo "error: $ACTOR_DIR is not a verl FSDP actor checkpoint" >&2; exit 2; }

python3 -m verl.model_merger merge --backend fsdp --local_dir "$ACTOR_DIR" --target_dir "$HF_OUT"

# the image processor config: preprocessor_config.json (hub layout) or processor_config.json (transformers 5)
has_processor() { [[ -f $1/preprocessor_config.json || -f $1/processor_config.json ]]; }
if ! has_processor "$HF_OUT"; then
  for src in "$ACTOR_DIR/huggingface" "${BASE_MODEL:-}"; do
    if [[ -n $src ]] && has_processor "$src"; then
      for f in preprocessor_config.json processor_config.json chat_template.json chat_template.jinja tokenizer.json \
               tokenizer_config.json vocab.json merges.txt special_tokens_map.json added_tokens.json; do
        [[ -f $src/$f && ! -f $HF_OUT/$f ]] && cp "$src/$f" "$HF_OUT/"
      done
      break
    fi
  done
fi
[[ -f $HF_OUT/config.json ]] && has_processor "$HF_OUT" || {
  echo "error: $HF_OUT lacks config.json or the processor files; set BASE_MODEL=<local Qwen2.5-VL dir>" >&2; exit 2; }
# optional check against a reference: python3 -m verl.model_merger test --backend fsdp --local_dir "$ACTOR_DIR" --test_hf_dir <dir>
echo "merged $ACTOR_DIR -> $HF_OUT"
