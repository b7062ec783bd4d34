"""What a cleaning run did, drawn: `python -m llm.data.report DIR` (DIR: the --output of `python -m llm.data.clean`).

Writes into DIR.clean/report/: removed.png (documents removed by each filter reason and as near-duplicates,
against those kept), lengths.png (document lengths before the cleaning and after, on a log scale),
clusters.png (how many kept documents stood for near-duplicate clusters of each size), and summary.txt (the
numbers behind them, also printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llm.data.corpus import cleaning_record, jsonl_rows
from llm.data.files import atomic_write


class ReportError(ValueError):
    pass


def _lengths(folder: Path) -> np.ndarray:
    parts = [np.frombuffer(p.read_bytes(), dtype=np.int64) for p in sorted(folder.glob("*.lengths"))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _kept_lengths(output: Path) -> np.ndarray:
    rows = (row for path in sorted(output.glob("*.jsonl.zst")) for row in jsonl_rows(path))
    return np.asarray([len(row["text"]) for row in rows], dtype=np.int64)


def summary_text(s: dict) -> str:
    read, kept = s["read"]["documents"], s["kept"]
    lines = [
        f"read {read:,} documents ({s['read']['bytes'] / 1e6:,.1f} MB from {s['read']['files']:,} files; "
        f"{s['read']['empty_skipped']:,} empty and {s['read']['binary_skipped']:,} binary skipped)",
        *(f"  dropped {n:,} {reason}" for reason, n in s["dropped_by_filter"].items()),
        f"  removed {s['duplicates_removed']:,} near-duplicates",
        f"kept {kept:,} ({kept / max(1, read):.1%}); profile {s['settings']['profile']}, "
        f"{s['settings']['tasks']} tasks, datatrove {s['versions']['datatrove']}",
        "clusters: " + ", ".join(f"{n:,} of size {size}" for size, n in s["cluster_sizes"].items()),
    ]
    return "\n".join(lines)


def draw(output: str | Path) -> Path:
    """Write the report of the cleaning that wrote `output`; return its folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    record = cleaning_record(output)
    if not (record / "summary.json").is_file():
        raise ReportError(f"{output} has no finished cleaning run beside it ({record / 'summary.json'} is missing); "
                          "run python -m llm.data.clean first")  # fmt: skip
    s = json.loads((record / "summary.json").read_text())
    folder = record / "report"
    folder.mkdir(exist_ok=True)

    removed = {**s["dropped_by_filter"], "near-duplicate": s["duplicates_removed"], "kept": s["kept"]}
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(removed)))
    bars = ax.barh(list(removed), list(removed.values()), color=["#c44"] * (len(removed) - 1) + ["#4a4"])
    ax.bar_label(bars, fmt="{:,.0f}", padding=3)
    ax.set_xlabel("documents")
    ax.set_title(f"{s['read']['documents']:,} documents read: removed by reason, and kept")
    fig.tight_layout()
    fig.savefig(folder / "removed.png", dpi=100)
    plt.close(fig)

    before, after = _lengths(record / "corpus"), _kept_lengths(output)
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(int(before.max(initial=1)), 2)
    bins = np.logspace(0, np.log10(top), 40)
    ax.hist(before, bins=bins, alpha=0.5, label=f"read ({len(before):,})")
    ax.hist(after, bins=bins, alpha=0.5, label=f"kept ({len(after):,})")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "lengths.png", dpi=100)
    plt.close(fig)

    sizes = {int(k): v for k, v in s["cluster_sizes"].items()}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([str(k) for k in sizes], list(sizes.values()))
    ax.set_yscale("log")
    ax.set_xlabel("near-duplicate cluster size (1: unique)")
    ax.set_ylabel("kept documents")
    fig.tight_layout()
    fig.savefig(folder / "clusters.png", dpi=100)
    plt.close(fig)

    atomic_write(folder / "summary.txt", (summary_text(s) + "\n").encode())
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llm.data.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("output", help="the --output directory of python -m llm.data.clean")
    args = p.parse_args(argv)
    try:
        folder = draw(args.output)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((folder / "summary.txt").read_text().rstrip())
    print(f"wrote {folder}: removed.png, lengths.png, clusters.png, summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
