#!/usr/bin/env bash
# On a GPU machine, one command: the GPU tests, the block-size tuning, the kernel, loss and training benchmarks.
# Results land under tools/results/ (tune_attention_<gpu>.json, kernels_<gpu>/, bench_loss_cuda.json,
# bench_train_<gpu>_<model>.json); commit them with the date, and freeze the tuned table it prints.
#   bash tools/gpu_check.sh
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). The kernel steps need
# torch, triton, numpy, sentencepiece, tqdm and matplotlib; the training benchmark also deepspeed and hydra-core
# (it is reported as a failure where they are missing; it logs to metrics.jsonl only, no W&B).
# Every step runs even when an earlier one fails; the failures are listed at the end (exit 1 if any).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' _)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
failed=()
step() {  # step NAME COMMAND...: run it, remember a failure, go on
  local name=$1
  shift
  echo "== $name: $*"
  "$@" || failed+=("$name (exit $?)")
}
# one process (the GPU image has no pytest-xdist, which the suite's default options use)
step "GPU tests" env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
  -m gpu tests/test_kernels_gpu.py
step "block-size tuning" "$PYTHON" tools/tune_attention.py
step "kernel benchmark" "$PYTHON" tools/bench_kernels.py
step "loss benchmark" "$PYTHON" tools/bench_loss.py
if "$PYTHON" -c "import deepspeed, hydra" 2>/dev/null; then
  for model in gpt2-124m gpt2-350m; do
    step "training benchmark $model" "$PYTHON" tools/bench_train.py "model=$model" data.seq_len=1024 \
      train.micro_batch=16 train.global_batch=16 --out "tools/results/bench_train_${gpu}_${model}.json"
  done
else
  failed+=("training benchmark (deepspeed and hydra-core are not importable with $PYTHON)")
fi
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all steps passed"
