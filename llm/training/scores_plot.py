"""A run's downstream task scores and val loss over its training steps, from its history (metrics.jsonl, read as
llm/training/metrics.py: read_history reads it across restarts): <run_dir>/evals/scores.png, one panel for the
val loss and one per task with its metrics. Drawn at the end of every launch that scored tasks, and by

    python -m llm.evaluate --plot runs/demo
"""

from __future__ import annotations

from pathlib import Path

from llm.training.downstream import EVALS_DIR
from llm.training.metrics import read_history

PLOT_FILE = "scores.png"


def score_series(history: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel: {metric: (steps, values)}}: panel "val" holds val/loss, a task's panel its eval/<task>/<metric>
    (perplexities in a panel of their own, "<task> (perplexity)")."""
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for record in history:
        for key, value in record.items():
            if key == "val/loss":
                panel, metric = "val", "loss"
            elif key.startswith("eval/") and key.count("/") == 2:
                _, panel, metric = key.split("/")
                if "perplexity" in metric:  # apart, on a log scale: they dwarf the task's other metrics
                    panel += " (perplexity)"
            else:
                continue
            steps, values = panels.setdefault(panel, {}).setdefault(metric, ([], []))
            steps.append(record["step"])
            values.append(value)
    return panels


def plot_scores(run_dir: str | Path) -> Path:
    """Draw the run's scores over steps; the PNG's path. ValueError if its history holds no scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    history = run_dir / "metrics.jsonl"
    if not history.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: name a run directory")
    panels = score_series(read_history(history))
    if not panels:
        raise ValueError(f"{history} holds no val/loss or eval/<task>/<metric> records yet")
    order = sorted(panels, key=lambda name: (name != "val", name.removesuffix(" (perplexity)"), name))
    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(order) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, order, strict=False):
        series = panels[panel]
        for metric, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, marker="o", markersize=3, label=metric)
        ax.set_title("val loss" if panel == "val" else panel, fontsize=10)
        ax.set_xlabel("step")
        if panel.endswith("(perplexity)"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    out = run_dir / EVALS_DIR / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
