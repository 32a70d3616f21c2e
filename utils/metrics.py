"""Classification metrics (scikit-learn) written as ``metrics.json`` plus a confusion-matrix PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import classification_report, confusion_matrix, f1_score

from utils.io import atomic_write, write_json

NONE = -1  # prediction index for "no parseable answer"


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class report and confusion matrix; ``-1`` predictions count as wrong."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    labels = list(range(len(class_names)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    per_class = {name: {k: float(v) for k, v in report[name].items()} for name in class_names}
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "unparseable": int((y_pred == NONE).sum()),
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def save_confusion_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str],
                       path: str | Path, title: str = "") -> Path:
    matrix = np.asarray(matrix)
    size = max(3.5, 0.6 * len(class_names) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    peak = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)


def _named_rows(histories: dict[str, Sequence[dict]]) -> list[dict]:
    """The rows of several histories in one list; with more than one, each key is prefixed by its history's name."""
    prefix = len(histories) > 1
    return [{"epoch": row["epoch"], **{(f"{name} {key}" if prefix else key): value for key, value in row.items()
                                       if key != "epoch"}}
            for name, rows in histories.items() for row in rows]


def save_curves_png(history: Sequence[dict] | dict[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Plot every numeric key of per-epoch records (``epoch`` on the x axis), losses and accuracies apart.

    ``history`` is one fit's rows (engine.fit's format, or stage 1's) or ``{name: rows}`` of several
    fits drawn together (the gates of one stage-3 run).
    """
    if isinstance(history, dict):
        history = _named_rows(history)
    keys = sorted({k for row in history for k, v in row.items()
                   if k != "epoch" and isinstance(v, (int, float))})
    loss_keys = [k for k in keys if "loss" in k]
    other_keys = [k for k in keys if "loss" not in k]
    panels = [ks for ks in (loss_keys, other_keys) if ks]
    fig = Figure(figsize=(5 * max(1, len(panels)), 3.5))
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key in panel:
            points = [(row["epoch"], row[key]) for row in history if key in row]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)


def write_metrics(folder: str | Path, metrics: dict, title: str = "",
                  name: str = "metrics.json") -> Path:
    """Write ``metrics.json`` and, when it has a confusion matrix, ``confusion_matrix.png`` beside it."""
    folder = Path(folder)
    path = write_json(folder / name, metrics)
    if "confusion_matrix" in metrics:
        png = folder / (Path(name).stem.replace("metrics", "confusion_matrix") + ".png")
        save_confusion_png(metrics["confusion_matrix"], metrics["class_names"], png, title)
    return path
