#!/usr/bin/env bash
# Refresh requirements.lock to the newest versions pyproject.toml allows, written only if the project passes on them:
#   bash tools/refresh_lock.sh
# In a scratch virtual environment (removed afterwards), `tools/setup.sh --unlocked` (PyTorch at TORCH_VERSION,
# default the lock's version; the newest setuptools; this project with its dev extras resolved afresh; `pip
# check`), then ruff and the whole suite as CI runs it. Only when all of that passes is the lock rewritten from
# what the environment holds; commit it with the suite's result. PYTHON picks the interpreter (the lock records
# its version). LOCK_TESTS replaces ruff and the suite with another command (run with the scratch environment
# first on PATH), LOCK_FILE writes another file, LOCK_VENV keeps the environment in that folder (reused when it
# is there): the tests of this script use all three.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=${LOCK_FILE:-requirements.lock}
if [ -n "${LOCK_VENV:-}" ]; then
  scratch=$LOCK_VENV
else
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
fi
py="$scratch/venv/bin/python"
export TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^torch==//p' requirements.lock)}
echo "== resolving: torch==$TORCH_VERSION and the newest versions of everything else (tools/setup.sh --unlocked)"
VENV="$scratch/venv" bash tools/setup.sh --unlocked
if [ -n "${LOCK_TESTS:-}" ]; then
  echo "== testing the new versions: $LOCK_TESTS"
  PATH="$scratch/venv/bin:$PATH" bash -c "$LOCK_TESTS"
else
  echo "== testing the new versions: ruff and the suite"
  "$scratch/venv/bin/ruff" check .
  LLM_REQUIRE_SLURM=1 $py -m pytest -q
fi
{
  echo "# Exact versions of every package of the CPU environment (the dev and hf extras included), installed by"
  echo "# tools/setup.sh; refreshed by tools/refresh_lock.sh, which writes it only after the suite passed on them."
  echo "# python: $($py -c 'import platform; print(platform.python_version().rsplit(".", 1)[0])')"
  echo "# platform: $($py -c 'import platform; print(platform.system(), platform.machine())')"
  echo "# made: $(date -u +%F)"
  # torch without its local label (2.13.0+cpu): the same version of the build each machine has
  $py -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^torch==\([^+]*\)+.*/torch==\1/'
} > "$lock.new"
mv "$lock.new" "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") packages)"
