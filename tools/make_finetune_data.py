"""Build the README's fine-tuning recipes' data from the Python standard library on this machine (no download;
the same files for the same Python version):

    python tools/make_finetune_data.py --output data/finetune

- sft_{train,val}.jsonl: {"prompt": "# <a function's docstring, first line>\\n", "response": "def name(args):"};
  the model learns to write the signature a docstring describes.
- classify_{train,val}.jsonl: {"text": <the first lines of a function>, "label": <its package>} for a handful
  of packages, balanced; which package a snippet comes from.
Train and val come from different files (a file's path hash decides; for classify, at least one file of each
package goes to val), so val never shows a file seen in training.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

PACKAGES = ["asyncio", "email", "logging", "unittest", "xml"]


def digest(path: Path, root: Path) -> float:
    """A number in [0, 1) fixed by the file's path under the library root."""
    return int.from_bytes(hashlib.sha256(str(path.relative_to(root)).encode()).digest()[:4], "big") / 2**32


def is_val(path: Path, root: Path, fraction: float) -> bool:
    return digest(path, root) < fraction


def functions(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, lines


def signature(node) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}):"


def sft_examples(root: Path, fraction: float) -> tuple[list, list]:
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts or "idlelib" in path.parts:
            continue
        for node, _ in functions(path):
            doc = ast.get_docstring(node)
            first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if not 10 <= len(first) <= 120 or node.name.startswith("_"):
                continue
            row = {"prompt": f"# {first}\n", "response": signature(node)}
            if len(row["response"]) <= 120:
                (val if is_val(path, root, fraction) else train).append(row)
    return train, val


def classify_examples(root: Path, fraction: float, per_class: int, lines: int) -> tuple[list, list]:
    train, val = [], []
    for package in PACKAGES:
        rows = {False: [], True: []}
        files = sorted(
            (p for p in (root / package).rglob("*.py") if "test" not in p.parts), key=lambda p: digest(p, root)
        )
        n_val = max(1, round(fraction * len(files)))  # every package has val files, even one of few files
        for i, path in enumerate(files):
            for node, source in functions(path):
                text = "\n".join(source[node.lineno - 1 : node.lineno - 1 + lines]).strip("\n")
                if len(text) >= 40:
                    rows[i < n_val].append({"text": text, "label": package})
        rng = random.Random(package)
        train += rng.sample(rows[False], min(per_class, len(rows[False])))
        val += rng.sample(rows[True], min(max(per_class // 5, 1), len(rows[True])))
    return train, val


def write(path: Path, rows: list) -> None:
    random.Random(str(path.name)).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="data/finetune")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="the standard library to read")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of files that go to val")
    p.add_argument("--per-class", type=int, default=300, help="classify: training snippets per package")
    p.add_argument("--lines", type=int, default=6, help="classify: lines per snippet")
    args = p.parse_args(argv)
    root = Path(args.stdlib)
    if not (root / "json" / "__init__.py").is_file():
        print(f"error: {root} is not a Python standard library (no json/__init__.py); pass --stdlib", file=sys.stderr)
        sys.exit(2)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sft_train, sft_val = sft_examples(root, args.val_fraction)
    cls_train, cls_val = classify_examples(root, args.val_fraction, args.per_class, args.lines)
    for name, rows in [
        ("sft_train", sft_train),
        ("sft_val", sft_val),
        ("classify_train", cls_train),
        ("classify_val", cls_val),
    ]:
        write(out / f"{name}.jsonl", rows)
    print(
        f"{out}: sft {len(sft_train)} train / {len(sft_val)} val; classify {len(cls_train)} train / "
        f"{len(cls_val)} val over {', '.join(PACKAGES)}"
    )


if __name__ == "__main__":
    main()
