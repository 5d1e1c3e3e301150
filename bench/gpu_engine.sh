#!/usr/bin/env bash
# GPU figures of the staged engine in one command (run from anywhere, on a machine with CUDA):
#   1. the CUDA tests (engine: graphs/eager/fp16 equal the eager model, queued admission;
#      preprocessing on the GPU equals the CPU)
#   2. latency at batch 1, 224x224: VGG19-BN, ResNet-50, MobileNetV3-Large, fp32 and fp16
#      (eager plain, CUDA-graph plain, eager stage-by-stage with every head, engine t_A and t_B)
#   3. deadline hit rate and timing-model p99 error on the GPU (ResNet-50)
# Usage: bench/gpu_engine.sh [python] [reps]     (defaults: python3 from PATH or $PYTHON, 200)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
REPS="${2:-200}"

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv || true

echo "== CUDA tests of the engine"
"$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_preprocess.py -k cuda

echo "== latency"
"$PY" bench/bench_gpu.py --reps "$REPS"

echo "== deadlines and p99 error on the GPU"
"$PY" bench/bench_engine.py --device cuda --models resnet50 --quick
