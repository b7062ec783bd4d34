"""Compare the Python environment that runs this with requirements.lock.

    python tools/check_lock.py              # exactly the lock: every package at its version, nothing else (CI)
    python tools/check_lock.py --overlap    # only the packages both have, e.g. on a GPU image with its own torch

Versions compare without a local label (torch 2.13.0+cpu is the lock's 2.13.0). Exit 1 with one line per
difference, 0 when there is none; `--overlap --report` prints the differences and exits 0 (a record of what a
benchmark ran with). pip, and this project itself, are not in the lock.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_LOCKED = {"pip", "llm-pretrain"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    """{package: version} of a lock file (lines `name==version`; comments and blank lines skipped)."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{n}: {line!r} is not name==version")
        pins[canonical(name.strip())] = public(version.strip())
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): public(d.version) for d in metadata.distributions() if d.metadata["Name"]}


def differences(lock: dict[str, str], here: dict[str, str], overlap: bool) -> list[str]:
    out = []
    for name in sorted(set(lock) | set(here)):
        if name in NOT_LOCKED or (overlap and not (name in lock and name in here)):
            continue
        if name not in here:
            out.append(f"{name}: locked {lock[name]}, not installed")
        elif name not in lock:
            out.append(f"{name}: {here[name]} installed, not in the lock")
        elif lock[name] != here[name]:
            out.append(f"{name}: locked {lock[name]}, installed {here[name]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/check_lock.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    p.add_argument("--overlap", action="store_true", help="compare only the packages installed here and locked")
    p.add_argument("--report", action="store_true", help="print the differences and exit 0")
    args = p.parse_args(argv)
    try:
        lock = read_lock(args.lock)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = differences(lock, installed(), args.overlap)
    for line in found:
        print(line)
    what = "the packages both have" if args.overlap else "every package"
    if not found:
        print(f"the environment matches {args.lock.name} ({what})")
    return 1 if found and not args.report else 0


if __name__ == "__main__":
    sys.exit(main())
