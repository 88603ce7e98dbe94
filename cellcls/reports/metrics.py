"""Metrics and the files of a test report: metrics.json, predictions.csv, the confusion matrix,
per_group.csv and the reliability diagram.

The one place that turns labels and probabilities into figures a researcher reads; the pictures
are drawn by `cellcls.reports.plots`, the intervals over source cells computed by
`cellcls.reports.intervals`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellcls.reports.intervals import cells_mostly_right, cluster_bootstrap, per_group
from cellcls.reports.plots import plot_confusion, plot_errors, plot_reliability
from cellcls.reports.trust_figures import N_BINS, calibration_error, trust_figures


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, loss, calibration error and per-class
    precision/recall/F1/support."""
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
        "calibration_error": calibration_error(labels, probs),
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


def reliability_bins(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS
) -> dict[str, np.ndarray]:
    """The reliability diagram's bins, as torchmetrics bins for the calibration error: `edges`
    (n_bins + 1, from 0 to 1; a top probability of 1 falls in the last bin), and per bin `count`,
    `confidence` (mean top probability) and `accuracy` (NaN for an empty bin)."""
    confidence = probs.max(1).astype(np.float64)
    right = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=right, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


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
    accuracy, balanced = f"{metrics['accuracy']:.4f}", f"{metrics['balanced_accuracy']:.4f}"
    if "accuracy_ci95" in metrics:  # 95% intervals over source cells (cellcls.reports.intervals)
        accuracy += f" {interval(metrics['accuracy_ci95'])} over {metrics['n_groups']} cells"
        balanced += f" {interval(metrics['balanced_accuracy_ci95'])}"
    ece = metrics.get("calibration_error")
    lines.append(
        f"accuracy {accuracy} · balanced accuracy {balanced} · macro-F1 "
        f"{metrics['macro_f1']:.4f} · loss {metrics['loss']:.4f}"
        + (f" · ECE {ece:.4f}" if ece is not None else "")
        + f" · {scored} images"
        + (
            f" · cells mostly right {metrics['cells_mostly_right']:.3f}"
            if "cells_mostly_right" in metrics
            else ""
        )
    )
    trust = metrics.get("trust") or {}
    if "calibration_error_uncalibrated" in trust:
        lines.append(
            f"temperature {trust['temperature']:.3f} (fitted on held-out cells): ECE "
            f"{trust['calibration_error_uncalibrated']:.4f} -> {ece:.4f}"
        )
    for level, row in (trust.get("conformal") or {}).items():
        if "mondrian" not in level:
            span = f" {interval(row['coverage_ci95'])}" if "coverage_ci95" in row else ""
            lines.append(
                f"sets at {level}: coverage {row['coverage']:.3f}{span}, mean size "
                f"{row['mean_set_size']:.2f} classes"
            )
    for level, row in (trust.get("abstain") or {}).items():
        kept = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "-"
        below = f"{row['threshold']:.3f}" if row["threshold"] is not None else "any confidence"
        lines.append(
            f"abstain below {below} (held-out accuracy {level}): keeps "
            f"{row['coverage']:.3f} of the images, accuracy {kept} on them"
        )
    ood = dict(trust.get("ood") or {})
    score = ood.pop("score", None)
    for rate, row in ood.items():
        span = f" {interval(row['false_flags_ci95'])}" if "false_flags_ci95" in row else ""
        lines.append(
            f"OOD flag ({score}, {rate} of held-out cells): flags {row['false_flags']:.3f}{span} "
            "of these images of the training classes"
        )
    return "\n".join(lines)


def interval(bounds: Sequence[float]) -> str:
    """A 95% interval as the console shows it: `[0.751, 0.950]`."""
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def grouped_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`classification_metrics`, and with `groups` (each image's source group) the 95% intervals
    over cells (`accuracy_ci95`, `balanced_accuracy_ci95`), `n_groups` and `cells_mostly_right`,
    with the per-group rows they come from (none without groups)."""
    metrics = classification_metrics(labels, probs, classes)
    if groups is None or not len(labels):
        return metrics, []
    correct = probs.argmax(1) == labels
    ci = cluster_bootstrap(correct, labels, groups, classes=classes)
    rows = per_group(groups, labels, correct, classes)
    metrics |= {k: ci[k] for k in ("accuracy_ci95", "balanced_accuracy_ci95", "n_groups")}
    return metrics | {"cells_mostly_right": cells_mostly_right(rows)}, rows


def write_report(
    out_dir: str | Path,
    paths: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[Any] | None = None,
    evidence: dict[str, Any] | None = None,
    coverage: Sequence[float] = (),
    abstain: Sequence[float] = (),
    ood: tuple[Sequence[float], np.ndarray] | None = None,
    **info: Any,
) -> dict[str, Any]:
    """Write metrics.json, predictions.csv, confusion_matrix.{csv,png}, errors.png,
    reliability.png and risk_coverage.png; with `groups` (each image's source group) also
    per_group.csv.

    metrics.json's `trust` holds the figures of `cellcls.reports.trust_figures`: with the
    checkpoint's held-out `evidence`, the calibration error before and after its temperature,
    conformal coverage and set size at each level of `coverage`, abstention at each accuracy of
    `abstain`, and with `ood` (rates, each image's OOD score) the flag's false flags.

    With groups, metrics.json gains the 95% intervals over source cells (`accuracy_ci95`,
    `balanced_accuracy_ci95`, `n_groups`: `cellcls.reports.intervals.cluster_bootstrap`) and
    `cells_mostly_right`, and predictions.csv a last column, `group`. `info` (e.g. split,
    checkpoint, n_split: the images in the split, when only `n_images` of them were scored) is
    stored in metrics.json as it is. Returns the metrics.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, rows = grouped_metrics(labels, probs, classes, groups)
    if rows:
        with (out / "per_group.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["group", "class", "images", "accuracy"])
            writer.writeheader()
            writer.writerows(r | {"accuracy": f"{r['accuracy']:.6f}"} for r in rows)
    metrics["trust"] = trust_figures(
        labels, probs, classes, groups, evidence, coverage, abstain, out, ood=ood
    )
    metrics |= info
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(out / "predictions.csv", paths, probs, classes, labels, groups)
    cm = np.asarray(metrics["confusion_matrix"])
    with (out / "confusion_matrix.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([c, *map(int, r)] for c, r in zip(classes, cm, strict=True))
    plot_confusion(cm, classes, out / "confusion_matrix.png")
    plot_errors(paths, labels, probs, classes, out / "errors.png")
    bins = reliability_bins(labels, probs)
    plot_reliability(bins, metrics["calibration_error"], out / "reliability.png")
    return metrics


def write_predictions(
    file: Path,
    paths: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    labels: np.ndarray | None = None,
    groups: Sequence[Any] | None = None,
    extra: dict[str, Sequence[Any]] | None = None,
) -> None:
    """predictions.csv: path, [label,] predicted class, one probability column per class [and
    the image's source group] [and `extra` columns: predict's `set` and `unsure`].

    eval writes the true label too; predict, on images without one, leaves that column out. The
    group (when the test report knows it) comes after the probabilities, so readers of the
    columns before it are unchanged; `cellcls.compare` pairs two runs' images by path and
    resamples them by group.
    """
    extra = extra or {}
    preds = probs.argmax(1)
    with file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "path",
                *(["label"] if labels is not None else []),
                "pred",
                *classes,
                *(["group"] if groups is not None else []),
                *extra,
            ]
        )
        for i, (path, p, row) in enumerate(zip(paths, preds, probs, strict=True)):
            label = [classes[labels[i]]] if labels is not None else []
            group = [groups[i]] if groups is not None else []
            more = [column[i] for column in extra.values()]
            writer.writerow([path, *label, classes[p], *(f"{v:.6f}" for v in row), *group, *more])
