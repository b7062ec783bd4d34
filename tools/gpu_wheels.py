"""The wheels a GPU machine needs beside its image, at the versions of requirements.lock.

    python tools/gpu_wheels.py                 # into .whl/ (ignored by git), for CPython 3.12 on x86-64 Linux
    python tools/gpu_wheels.py --out DIR --python 3.11

The GPU image brings torch, triton, transformers and the rest of the numeric stack but not DeepSpeed, Hydra or
pydantic, and reaches no package registry: this fetches those packages on a machine that does. Binary wheels
come from PyPI; DeepSpeed and antlr4-python3-runtime publish only sources, so they are built here (pure Python:
DeepSpeed without compiled ops). On the GPU machine, from the checkout with the folder carried along:

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD

`python tools/check_lock.py --overlap --report` there prints which of the image's own packages differ from the lock
(tools/gpu_check.sh does, first).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from check_lock import ROOT, read_lock

# what the GPU image lacks: DeepSpeed and what it needs beyond the image, Hydra and OmegaConf
PACKAGES = (
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
)
SOURCE_ONLY = ("deepspeed", "antlr4-python3-runtime")


def pip(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"pip {args[0]} failed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/gpu_wheels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".whl")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    p.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    args = p.parse_args(argv)
    try:
        lock = read_lock(args.lock)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = [name for name in PACKAGES if name not in lock]
    if missing:
        print(f"error: {args.lock} has no {', '.join(missing)}: refresh it (tools/refresh_lock.sh)", file=sys.stderr)
        return 2
    abi = "cp" + args.python.replace(".", "")
    target = ["--python-version", args.python, "--implementation", "cp", "--abi", abi]
    target += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        built = [f"{n}=={lock[n]}" for n in SOURCE_ONLY]
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(args.out), *built)
        fetched = [f"{n}=={lock[n]}" for n in PACKAGES if n not in SOURCE_ONLY]
        pip("download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(args.out), *fetched)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(PACKAGES)} packages at the lock's versions in {args.out}: {', '.join(built + fetched)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
