#!/usr/bin/env bash
# GPU smoke test on one GPU (docs/benchmarks.md):
#   1. a small synthetic world, a tokenizer and a short VQ tokenizer (opt vq train --device cuda);
#   2. the tiny config, 200 steps;
#   3. the base config (224 px: the pipeline resizes the world's 64 px images), 20 steps, ZeRO-2, bf16;
#   4. opt eval --limit of the tiny model on the GPU;
#   5. samples/s (from each run's metrics.jsonl) and MFU against a bf16 matmul measured on the GPU
#      (scripts/gpu_smoke_report.py).
# Without a GPU it stops at once with one line. --cpu-check runs the same pipeline on the CPU with
# 2 steps per run, fp32 and a one-layer base (the plumbing, not the figures).
#
#   scripts/gpu_smoke.sh [--cpu-check] [--keep DIR]
#
# --keep DIR works in DIR and leaves it (default: a temporary folder, removed at the end).
# SMOKE_BASE_BATCH sets the base run's batch size (default 32). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
keep=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-check) mode=cpu ;;
        --keep) keep="${2:?--keep needs a folder}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_smoke: unknown argument $1 (--cpu-check, --keep DIR)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
opt() { "$PYTHON" -m opt "$@"; }

gpu_check='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
if [[ $mode == gpu ]] && ! "$PYTHON" -c "$gpu_check"; then
    echo "gpu_smoke: no CUDA GPU visible to torch (scripts/gpu_smoke.sh --cpu-check dry-runs it on the CPU)" >&2
    exit 1
fi

if [[ -n $keep ]]; then
    work=$keep
    mkdir -p "$work"
else
    work=$(mktemp -d -t opt-gpu-smoke.XXXXXX)
    trap 'rm -rf "$work"' EXIT
fi

if [[ $mode == gpu ]]; then
    device=cuda
    world=(--train 1000 --val 64 --test 64 --test-novel 64 --workers 8)
    vq=(vq_train.steps=300 data.workers=4)
    tiny=(train.steps=200 train.log_every=20 data.workers=4)
    base=(train.steps=20 train.log_every=5 train.precision=bf16 "data.batch_size=${SMOKE_BASE_BATCH:-32}"
          data.workers=8)
    evaluate=(--limit 64)
else
    device=cpu
    world=(--train 16 --val 8 --test 8 --test-novel 8 --workers 1)
    vq=(vq_train.steps=2 data.workers=0)
    tiny=(train.steps=2 train.log_every=1 data.batch_size=4 data.workers=0)
    base=(train.steps=2 train.log_every=1 train.precision=fp32 data.batch_size=4 data.workers=0
          model.vision.layers=1 model.text.layers=1 model.audio.layers=1 model.cross.layers=1
          model.text_decoder.layers=1 model.image_decoder.layers=1)
    evaluate=(--limit 4 --generate-count 2 --candidates 2 --rerank-k 2 --batch-size 2)
fi

echo "gpu_smoke: $mode check in $work"
opt data synth --out "$work/world" "${world[@]}" --shard-size 500 --seed 0
opt tokenizer train --data "$work/world/train-*.tar" --out "$work/tokenizer.model"
opt vq train --config configs/tiny.yaml --device "$device" --data "$work/world/train-*.tar" \
    --val "$work/world/val-*.tar" --out "$work/vq" "${vq[@]}"

# the mixture from step 0 (no curriculum), no validation and no checkpoint inside the timed windows
data=("data.train=$work/world/train-*.tar" "data.val=$work/world/val-*.tar" "tokenizer.path=$work/tokenizer.model"
      "tasks.phases=[]" train.eval_every=0 train.checkpoint_every=100000)
opt train --config configs/tiny.yaml --run-dir "$work/tiny" "${data[@]}" "train.vq_path=$work/vq" "${tiny[@]}"
opt train --config configs/base.yaml --run-dir "$work/base" "${data[@]}" data.image_size=224 train.zero_stage=2 \
    "${base[@]}"

opt export "$work/tiny" --out "$work/tiny_model"
opt eval --model "$work/tiny_model" --data "$work/world" --out "$work/report" --device "$device" --no-meteor \
    "${evaluate[@]}"

"$PYTHON" scripts/gpu_smoke_report.py --device "$device" "$work/tiny" "$work/base" --out "$work/smoke.json"
echo "gpu_smoke: $mode check passed"
