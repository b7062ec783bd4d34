#!/bin/bash
# `python`, except that `python -m llm.train ...` runs under tests/fault_worker.py (LLM_FAULT picks the faults):
# job scripts take the interpreter from $PYTHON, so the Slurm tests point PYTHON here. REAL_PYTHON is the
# interpreter to use.
if [ "$1" = "-m" ] && [ "$2" = "llm.train" ]; then
  shift 2
  exec "$REAL_PYTHON" "$(dirname "$0")/fault_worker.py" "$@"
fi
exec "$REAL_PYTHON" "$@"
