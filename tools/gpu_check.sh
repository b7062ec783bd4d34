#!/usr/bin/env bash
# On a GPU machine, one command: the GPU tests, the block-size tuning, the kernel, loss and training benchmarks.
# Results land under tools/results/ (tune_attention_<gpu>.json, kernels_<gpu>/, bench_loss_cuda.json,
# bench_train_<gpu>_<model>.json); commit them with the date, and freeze the tuned table it prints.
#   bash tools/gpu_check.sh                  # every step, in this order: tests tune kernels loss train
#   bash tools/gpu_check.sh tests tune       # only these steps (e.g. to split the run into shorter commands)
# Each step prints its wall time. The tuning compiles its few hundred candidates in parallel processes first
# (tools/tune_attention.py --compile-jobs), then times them one at a time.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). The kernel steps need
# torch, triton, numpy, sentencepiece, tqdm and matplotlib; the training benchmark and the GPU synchronisation
# test also deepspeed and hydra-core (the benchmark is reported as a failure where they are missing, the test
# skips; they log to metrics.jsonl only, no W&B). Where the image lacks them, the wheels that
# `python tools/gpu_wheels.py` fetched at the lock's versions into .whl/ (GPU_WHEELS: another folder) are
# installed into a scratch directory first. The packages whose versions differ from requirements.lock are printed.
# Liger-Kernel's norms and fused cross-entropy join the benchmarks as baselines where `liger-kernel` is importable
# (pure Python: `pip download --no-deps liger-kernel -d DIR` on a machine with an index, install from DIR there).
# Every step runs even when an earlier one fails; the failures are listed at the end (exit 1 if any).
set -uo pipefail
cd "$(dirname "$0")/.."
all_steps=(tests tune kernels loss train)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${all_steps[@]}")
for s in "${steps[@]}"; do
  if [[ " ${all_steps[*]} " != *" $s "* ]]; then
    echo "error: unknown step '$s'; the steps are: ${all_steps[*]}" >&2
    exit 2
  fi
done
wants() { [[ " ${steps[*]} " == *" $1 "* ]]; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=${GPU_WHEELS:-.whl}
if [ -d "$wheels" ] && ! "$PYTHON" -c "import deepspeed, hydra" 2>/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
echo "== the packages this environment and requirements.lock both have, where their versions differ:"
"$PYTHON" tools/check_lock.py --overlap --report
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' _)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
failed=()
step() {  # step NAME COMMAND...: run it, remember a failure, go on
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@" || failed+=("$name (exit $?)")
  echo "== $name: $((SECONDS - start)) s"
}
# one process (the GPU image has no pytest-xdist, which the suite's default options use)
if wants tests; then
  step "GPU tests" env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
    -m gpu tests/test_kernels_gpu.py tests/test_syncs_gpu.py
fi
wants tune && step "block-size tuning" "$PYTHON" tools/tune_attention.py
wants kernels && step "kernel benchmark" "$PYTHON" tools/bench_kernels.py
wants loss && step "loss benchmark" "$PYTHON" tools/bench_loss.py
if wants train; then
  if "$PYTHON" -c "import deepspeed, hydra" 2>/dev/null; then
    for model in gpt2-124m gpt2-350m; do
      step "training benchmark $model" "$PYTHON" tools/bench_train.py "model=$model" data.seq_len=1024 \
        train.micro_batch=16 train.global_batch=16 --out "tools/results/bench_train_${gpu}_${model}.json"
    done
  else
    failed+=("training benchmark (deepspeed and hydra-core are not importable with $PYTHON)")
  fi
fi
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all steps passed (${steps[*]})"
