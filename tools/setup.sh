#!/usr/bin/env bash
# Set up the virtual environment .venv, safe to rerun:
#   bash tools/setup.sh              # the locked environment: exactly the versions in requirements.lock
#   bash tools/setup.sh --unlocked   # the newest versions pyproject.toml allows (TORCH_VERSION: torch, default 2.13.0)
# Locked: every package from requirements.lock (PyTorch's CPU build where this machine has it, the build backend
# too), then this project editable without resolving anything, then `pip check`. PYTHON picks the interpreter
# (default python3); the lock was made with the Python it names. VENV puts the environment elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=locked
case "${1:-}" in
  "") ;;
  --unlocked) mode=unlocked ;;
  *) echo "error: unknown option '$1': run with no option (the lock) or --unlocked" >&2; exit 2 ;;
esac
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
if [ "$mode" = unlocked ]; then
  pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  pip install -q -U setuptools
  pip install -q --no-build-isolation -e '.[dev]'
else
  made_with=$(sed -n 's/^# python: *//p' requirements.lock)
  here=$("$venv/bin/python" -c 'import platform; print(platform.python_version().rsplit(".", 1)[0])')
  if [ "$made_with" != "$here" ]; then
    echo "warning: requirements.lock was made with Python $made_with, $venv has $here; if the install fails," \
      "set PYTHON to a Python $made_with or use --unlocked" >&2
  fi
  pip install -q -r requirements.lock
  pip install -q --no-deps --no-build-isolation -e .
fi
pip check
