#!/usr/bin/env bash
# On a GPU machine, one command: the GPU tests, the kernel benchmark and the training benchmarks.
# Results land under tools/results/ (kernels_<gpu>/, bench_train_<gpu>.json); commit them with the date.
#   bash tools/gpu_check.sh            (after bash tools/setup.sh, or with PYTHON pointing at an env that has
#                                       the project and a CUDA build of torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu tests/test_kernels_gpu.py
"$PY" tools/bench_kernels.py
for model in gpt2-124m gpt2-350m; do
  "$PY" tools/bench_train.py "model=$model" data.seq_len=1024 train.micro_batch=16 train.global_batch=16 \
    --out "tools/results/bench_train_$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' _)_$model.json"
done
