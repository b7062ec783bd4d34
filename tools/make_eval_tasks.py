"""Write the offline evaluation tasks shipped in llm/evals/tasks/ (lm-evaluation-harness YAMLs over local JSONL),
built with a fixed seed from the standard library's test suite: held out from the demo's corpus, which leaves
the test suites out (llm/data/corpus.py: stdlib_files), and present wherever CPython's tests are installed.

    python tools/make_eval_tasks.py                      # rewrites llm/evals/tasks/*.jsonl
    python tools/make_eval_tasks.py --output DIR --n 50

- stdlib_next_line: eight lines of a test module, then the true next line among four (the others: lines of
  other modules with the same indentation, so that indentation does not give it away); accuracy.
- stdlib_docstring: a test function's `def` line and the opening quotes, then its docstring among four
  docstrings of other functions; accuracy and length-normalised accuracy.
- stdlib_completion: eight lines of a test module and the start of the next, to be completed by greedy
  generation up to the end of the line; exact match.
- stdlib_rolling: whole test modules (their first 4,000 characters), scored as rolling log-likelihood: word and
  byte perplexity and bits per byte.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261205


def test_modules() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(p for p in root.glob("test_*.py") if 2_000 < p.stat().st_size < 200_000)
    if len(files) < 40:
        raise SystemExit(f"error: too few test modules under {root} ({len(files)}): CPython's test suite is needed")
    return files


def _candidate(line: str) -> bool:
    s = line.strip()
    return len(s) >= 12 and not s.startswith(("#", '"', "'")) and s.isascii()


def next_line(files: list[Path], n: int, rng: random.Random) -> list[dict]:
    lines = {f: f.read_text(encoding="utf-8", errors="replace").splitlines() for f in files}
    by_indent: dict[int, list[tuple[Path, str]]] = {}
    for f, ls in lines.items():
        for line in ls:
            if _candidate(line):
                by_indent.setdefault(len(line) - len(line.lstrip()), []).append((f, line))
    rows = []
    while len(rows) < n:
        f = rng.choice(files)
        ls = lines[f]
        if len(ls) < 20:
            continue
        i = rng.randrange(8, len(ls) - 1)
        true = ls[i]
        pool = by_indent.get(len(true) - len(true.lstrip()), [])
        others = sorted({line for g, line in pool if g != f and line != true})
        if not _candidate(true) or len(others) < 3:
            continue
        choices = [true, *rng.sample(others, 3)]
        rng.shuffle(choices)
        rows.append({"context": "\n".join(ls[i - 8 : i]) + "\n", "choices": choices, "label": choices.index(true)})
    return rows


def docstrings(files: list[Path], n: int, rng: random.Random) -> list[dict]:
    found = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        source = f.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(tree):
            doc = ast.get_docstring(node, clean=False) if isinstance(node, ast.FunctionDef) else None
            if doc and 20 <= len(doc) <= 300 and doc.isascii() and '"""' not in doc:
                found.append((source[node.lineno - 1].strip(), doc.strip()))
    rng.shuffle(found)
    rows = []
    for signature, doc in found[:n]:
        others = rng.sample([d for _, d in found if d != doc], 3)
        choices = [doc, *others]
        rng.shuffle(choices)
        rows.append({"context": f'{signature}\n    """', "choices": choices, "label": choices.index(doc)})
    return rows


def completion(files: list[Path], n: int, rng: random.Random) -> list[dict]:
    rows = []
    while len(rows) < n:
        f = rng.choice(files)
        ls = f.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(ls) < 20:
            continue
        i = rng.randrange(8, len(ls) - 1)
        line = ls[i]
        if not _candidate(line) or len(line.strip()) < 20:
            continue
        cut = rng.randrange(len(line) * 2 // 3, len(line) - 3)  # the last third: 4 or more characters to write
        rows.append({"context": "\n".join(ls[i - 8 : i]) + "\n" + line[:cut], "target": line[cut:]})
    return rows


def rolling(files: list[Path], n: int, rng: random.Random) -> list[dict]:
    return [{"text": f.read_text(encoding="utf-8", errors="replace")[:4000]} for f in rng.sample(files, n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "llm" / "evals" / "tasks"))
    p.add_argument("--n", type=int, default=200, help="examples per multiple-choice task (rolling: n / 5 modules)")
    args = p.parse_args(argv)
    files, out = test_modules(), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tasks = {
        "stdlib_next_line": next_line(files, args.n, random.Random(SEED)),
        "stdlib_docstring": docstrings(files, args.n, random.Random(SEED + 1)),
        "stdlib_completion": completion(files, args.n, random.Random(SEED + 3)),
        "stdlib_rolling": rolling(files, max(1, args.n // 5), random.Random(SEED + 2)),
    }
    for name, rows in tasks.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / name}.jsonl: {len(rows)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
