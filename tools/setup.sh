#!/usr/bin/env bash
# Set up a virtual environment in .venv: PyTorch (the CPU build on a CPU machine), then this project
# with its dev extras, editable. Safe to rerun. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
