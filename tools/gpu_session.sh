#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU (UNVERIFIED: no GPU has run it yet).
#
#   device tool: run(command="bash tools/gpu_session.sh", timeout_s=600)
#
# 1. issue 13: benchmarks/gpu_real_shape.py (real 26B-A4B shape, random weights, through the scheduler and
#    the TorchRunner: CUDA graphs, sampler tiles on the GPU) at 1, 4, 16, 32, 64 canvases -> gpu_real_shape.json
# 2. issue 6: the tiny model trained on from the shipped checkpoint on the GPU (batch 256, the shipped
#    recipe's corruption, a warm restart of the learning rate) -> ckpt/ (the 5 checkpoint files)
# Everything printed goes to session.log, with the card's name. Output: $OUT (./gpu_out elsewhere),
# 7 files, within the device tool's 8. Back here: `python -m tools.tiny_model.evaluate --checkpoint DIR`.
# Time: at most GPU_BENCH_S (230 s) + TRAIN_S (270 s) + a few seconds of nvidia-smi: about 510 s, inside one
# 600 s call with margin (a timeout kills a step, the rest still runs and the log still comes back).
# Knobs (environment): GPU_BENCH_S (230 s), TRAIN_S (270 s), TRAIN_MIN (3.5), STEPS (3000), BATCH (256), LR (1.5e-3),
# DEVICE (cuda), GPU_BENCH_ARGS, PYTHON (python3). A CPU dry run of the plumbing:
#   DEVICE=cpu GPU_BENCH_ARGS=--smoke-cpu TRAIN_MIN=0.2 STEPS=5 BATCH=4 OUT=/tmp/dry bash tools/gpu_session.sh
set -u
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
SHIPPED=service/assets/tiny-diffusiongemma
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/ckpt"
cp "$SHIPPED/generation_config.json" "$OUT/ckpt/"  # the shipped sampler defaults survive the export
WORK=$(mktemp -d)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: none"
  $PY -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())'

  echo "== benchmarks/gpu_real_shape.py ${GPU_BENCH_ARGS:-}"
  # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a word list
  timeout "${GPU_BENCH_S:-230}" $PY benchmarks/gpu_real_shape.py ${GPU_BENCH_ARGS:-} > "$OUT/gpu_real_shape.json"
  echo "gpu_real_shape.py exit $?"
  cat "$OUT/gpu_real_shape.json"

  start=$($PY -c "import json; print(json.load(open('$SHIPPED/training_meta.json'))['steps'])")
  echo "== tools.tiny_model.train from step $start"
  timeout "${TRAIN_S:-270}" $PY -m tools.tiny_model.train --device "${DEVICE:-cuda}" --init-from "$SHIPPED" \
    --workdir "$WORK" --out "$OUT/ckpt" --batch "${BATCH:-256}" --lr "${LR:-1.5e-3}" --warm-restart \
    --steps $((start + ${STEPS:-3000})) --minutes "${TRAIN_MIN:-3.5}" --save-every 500 \
    --span-fraction 0.75 --span-min-noise 0.05 --max-prefix 80
  echo "train exit $?"
  tail -n 3 "$WORK/log.jsonl"
  cat "$OUT/ckpt/training_meta.json"
  date -u
} > "$OUT/session.log" 2>&1
rm -rf "$WORK"
