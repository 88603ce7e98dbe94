"""Metrics and the files of a test report: metrics.json, predictions.csv, the confusion matrix.

The one place that turns labels and probabilities into figures a researcher reads; the pictures
are drawn by `cellcls.reports.plots`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellcls.reports.plots import plot_confusion, plot_errors


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, loss and per-class precision/recall/F1/support."""
    n = len(classes)
    preds = probs.argmax(1)
    cm = np.bincount(labels * n + preds, minlength=n * n).reshape(n, n)
    support, predicted, correct = cm.sum(1), cm.sum(0), np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, correct / predicted, 0.0)
        recall = np.where(support > 0, correct / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    p_true = probs[np.arange(len(labels)), labels].astype(np.float64)
    return {
        "accuracy": float(correct.sum() / max(len(labels), 1)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": float(-np.log(np.clip(p_true, 1e-12, None)).mean()) if len(labels) else 0.0,
        "n_images": len(labels),
        "classes": list(classes),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


def format_table(metrics: Mapping[str, Any]) -> str:
    """A short per-class table with the overall figures, for the console."""
    scored = metrics["n_images"]
    if metrics.get("n_split", scored) != scored:
        scored = f"{scored} of the split's {metrics['n_split']}"
    lines = [f"{'class':<12} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for c, m in metrics["per_class"].items():
        lines.append(
            f"{c:<12} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {m['support']:>8}"
        )
    lines.append(
        f"accuracy {metrics['accuracy']:.4f} · balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f} · macro-F1 {metrics['macro_f1']:.4f} · "
        f"loss {metrics['loss']:.4f} · {scored} images"
    )
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    paths: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    **info: Any,
) -> dict[str, Any]:
    """Write metrics.json, predictions.csv, confusion_matrix.{csv,png} and errors.png.

    `info` (e.g. split, checkpoint, n_split: the images in the split, when only `n_images` of
    them were scored) is stored in metrics.json as it is. Returns the metrics.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(labels, probs, classes) | info
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(out / "predictions.csv", paths, probs, classes, labels)
    cm = np.asarray(metrics["confusion_matrix"])
    with (out / "confusion_matrix.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([c, *map(int, r)] for c, r in zip(classes, cm, strict=True))
    plot_confusion(cm, classes, out / "confusion_matrix.png")
    plot_errors(paths, labels, probs, classes, out / "errors.png")
    return metrics


def write_predictions(
    file: Path,
    paths: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    labels: np.ndarray | None = None,
) -> None:
    """predictions.csv: path, [label,] predicted class and one probability column per class.

    eval writes the true label too; predict, on images without one, leaves that column out.
    """
    preds = probs.argmax(1)
    with file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *(["label"] if labels is not None else []), "pred", *classes])
        for i, (path, p, row) in enumerate(zip(paths, preds, probs, strict=True)):
            label = [classes[labels[i]]] if labels is not None else []
            writer.writerow([path, *label, classes[p], *(f"{v:.6f}" for v in row)])
