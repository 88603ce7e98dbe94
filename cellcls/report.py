"""Reports and plots: metrics, predictions, confusion matrices, errors and training curves.

The one place that turns labels and probabilities into files a researcher reads or looks at.
Figures use matplotlib's object API (no pyplot), so nothing depends on a display or a backend.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor


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


def list_unreadable(bad: Mapping[str, str]) -> str:
    """Unreadable files, one `  path: reason` line each, for the log or an error message."""
    return "\n".join(f"  {path}: {why}" for path, why in sorted(bad.items()))


def write_unreadable(file: Path, bad: Mapping[str, str]) -> None:
    """A CSV of unreadable files (path, reason): skipped_images.csv and predict's unreadable.csv."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "reason"), *sorted(bad.items())])


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    for ax, values, title, fmt in (
        (fig.add_subplot(1, 2, 1), cm, "counts", "d"),
        (fig.add_subplot(1, 2, 2), norm, "row-normalised (recall)", ".2f"),
    ):
        shown = values / values.max() if values.max() > 0 else values
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                color="white" if shown[i, j] > 0.5 else "black",
            )
        ax.set(
            title=title,
            xlabel="predicted",
            ylabel="true",
            xticks=range(len(classes)),
            yticks=range(len(classes)),
        )
        ax.set_xticklabels(classes, rotation=30, ha="right")
        ax.set_yticklabels(classes)
    fig.savefig(path, dpi=100)


def plot_errors(
    paths: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: Path,
    n: int = 16,
) -> None:
    """A grid of the `n` most confidently wrong images, with true and predicted class."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-probs[wrong, preds[wrong]])][:n]
    cols = 4
    rows = max(1, math.ceil(len(wrong) / cols))
    fig = Figure(figsize=(3 * cols, 3.2 * rows), layout="constrained")
    if not len(wrong):
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", fontsize=16)
        ax.axis("off")
    for k, i in enumerate(wrong):
        ax = fig.add_subplot(rows, cols, k + 1)
        with Image.open(paths[i]) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(
            f"true {classes[labels[i]]}\npred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})",
            fontsize=9,
        )
        ax.axis("off")
    fig.savefig(path, dpi=80)


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """Loss and accuracy per epoch for train and val, from one dict of metrics per epoch."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for k, metric in enumerate(("loss", "acc")):
        ax = fig.add_subplot(1, 2, k + 1)
        for stage in ("train", "val"):
            key = f"{stage}/{metric}"
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=stage)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def plot_groups(
    paths: Sequence[str],
    groups: np.ndarray,
    classes: Sequence[str],
    path: Path,
    rows: int = 8,
    per_row: int = 8,
    seed: int = 0,
) -> None:
    """A few source groups, one row of thumbnails each: groups that span several class folders
    first, then a seeded random choice of the others."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    mixed = [g for g in ids if len({classes[i] for i in np.flatnonzero(groups == g)}) > 1]
    others = [g for g in rng.permutation(ids) if g not in mixed]
    shown = (mixed + others)[:rows]
    per_row = min(per_row, max((int(np.sum(groups == g)) for g in shown), default=1))
    fig = Figure(figsize=(1.6 * per_row, 1.5 * max(len(shown), 1)), layout="constrained")
    for r, g in enumerate(shown):
        members = np.flatnonzero(groups == g)
        picked = rng.choice(members, min(per_row, len(members)), replace=False)
        for k, i in enumerate(sorted(picked)):
            ax = fig.add_subplot(max(len(shown), 1), per_row, r * per_row + k + 1)
            with Image.open(paths[i]) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(classes[i][:4], fontsize=7)
            if k == 0:
                ax.set_ylabel(f"group {g}\n{len(members)} images", fontsize=8)
    fig.savefig(path, dpi=80)


def plot_crops(
    images: Tensor, labels: Tensor, classes: Sequence[str], path: Path, per_class: int = 10
) -> None:
    """One row of images (uint8, N x 3 x H x W) per class, to check the crops at a glance."""
    fig = Figure(figsize=(1.3 * per_class, 1.4 * len(classes)), layout="constrained")
    for r, name in enumerate(classes):
        members = (labels == r).nonzero().flatten()[:per_class]
        for k, i in enumerate(members.tolist()):
            ax = fig.add_subplot(len(classes), per_class, r * per_class + k + 1)
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.savefig(path, dpi=80)
