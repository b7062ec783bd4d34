"""Classification metrics from scikit-learn, and their plots (matplotlib): accuracy, per-class precision / recall
/ F1, macro-F1, the confusion matrix, ROC-AUC (one-vs-rest for more than two classes) and the ROC curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def report(logits: np.ndarray, y: np.ndarray, labels: list[str], majority: int | None = None) -> dict:
    """Every metric of predictions `logits` (n, classes) against true class indices `y` (n,); with `majority`
    (the training set's commonest class) also the accuracy and macro-F1 of always predicting it."""
    from sklearn import metrics as M

    probs, classes = softmax(logits.astype(np.float64)), list(range(len(labels)))
    pred = probs.argmax(axis=1)
    p, r, f, support = M.precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    present = np.unique(y)
    if len(present) < 2:
        auc = None  # undefined with one class in the data
    elif len(labels) == 2:
        auc = float(M.roc_auc_score(y, probs[:, 1]))
    else:  # macro one-vs-rest over the classes present
        auc = float(
            M.roc_auc_score(
                y, probs[:, present] / probs[:, present].sum(1, keepdims=True), multi_class="ovr", labels=present
            )
        )
    return {
        "examples": int(len(y)),
        "loss": float(M.log_loss(y, probs, labels=classes)),
        "accuracy": float(M.accuracy_score(y, pred)),
        "macro_f1": float(M.f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "roc_auc": auc,
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": M.confusion_matrix(y, pred, labels=classes).tolist(),  # rows: true, columns: predicted
        "labels": labels,
        "majority_baseline": None
        if majority is None
        else {
            "label": labels[majority],
            "accuracy": float(np.mean(np.asarray(y) == majority)),
            "macro_f1": float(
                M.f1_score(y, np.full(len(y), majority), labels=classes, average="macro", zero_division=0)
            ),
        },
        "_probs": probs,
        "_y": np.asarray(y),
    }


def write_report(r: dict, out: Path) -> None:
    """metrics.json, roc.png and confusion.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=2))
    labels, probs, y = r["labels"], r["_probs"], r["_y"]
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, name in enumerate(labels if len(labels) > 2 else labels[1:]):
        c = i if len(labels) > 2 else 1
        if 0 < (y == c).sum() < len(y):
            RocCurveDisplay.from_predictions(y == c, probs[:, c], name=f"{name} vs rest", ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    auc = "n/a" if r["roc_auc"] is None else f"{r['roc_auc']:.3f}"
    ax.set_title(f"ROC (macro AUC {auc})")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2))
    ConfusionMatrixDisplay(np.array(r["confusion_matrix"]), display_labels=labels).plot(
        ax=ax, colorbar=False, xticks_rotation=45
    )
    ax.set_title(f"accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
