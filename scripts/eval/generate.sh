#!/usr/bin/env bash
# IV-Edit generation on every GPU of this machine: one process per GPU, each on its own shard.
#
#   bash scripts/eval/generate.sh configs/eval/replan_flux_kontext.yaml          # all GPUs (nvidia-smi -L)
#   bash scripts/eval/generate.sh configs/eval/replan_flux_kontext.yaml 4        # GPUs 0-3
#   bash scripts/eval/generate.sh configs/eval/tiny.yaml 2 --limit 4 steps=2    # extra args go to every rank
#
# Rank i runs `CUDA_VISIBLE_DEVICES=i python -m replan.eval.generate --config CFG --rank i --world N ARGS...`
# (the i-th entry of $CUDA_VISIBLE_DEVICES when that is set; its length is then the default N) and logs to
# <LOG_DIR>/rank_i.log (LOG_DIR defaults to outputs/eval/logs/<config name>). Ctrl-C or a kill stops every rank.
# The exit code is 0 when every rank finished every sample, else the first non-zero rank code (1: some samples
# failed and have error.txt; 2: bad config / refused run). Set PYTHON to choose the interpreter.
set -u

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 <config.yaml> [n_gpus] [generate args / key=value overrides...]" >&2
    exit 2
fi
config=$1
shift
visible=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"  # respect a restriction already in place
fi
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    n=$1
    shift
elif [ ${#visible[@]} -gt 0 ]; then
    n=${#visible[@]}
else
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ -z "$n" ] || [ "$n" -lt 1 ]; then
    echo "no GPU found (nvidia-smi -L); running one process" >&2
    n=1
fi
python=${PYTHON:-python}
log_dir=${LOG_DIR:-outputs/eval/logs/$(basename "$config" .yaml)}
mkdir -p "$log_dir"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

for ((i = 0; i < n; i++)); do
    gpu=$i
    if [ ${#visible[@]} -gt 0 ]; then
        gpu=${visible[$((i % ${#visible[@]}))]}
    fi
    CUDA_VISIBLE_DEVICES=$gpu "$python" -m replan.eval.generate --config "$config" --rank "$i" --world "$n" "$@" \
        >"$log_dir/rank_$i.log" 2>&1 &
    pids+=("$!")
    echo "rank $i/$n: pid $! on GPU $gpu, log $log_dir/rank_$i.log" >&2
done

status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    tail -n 2 "$log_dir/rank_$i.log" >&2
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
    fi
done
pids=()
exit "$status"
