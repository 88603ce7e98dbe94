"""The test report's figures of trust: calibration before and after, conformal coverage and set
size, selective prediction (risk-coverage), each with its 95% interval over source cells.

The held-out record they use (`evidence`: temperature, conformal scores, abstention evidence)
is the checkpoint's (`cellcls.reports.trust`), fitted on grouped validation, never on TEST.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.classification import MulticlassCalibrationError

from cellcls.reports.intervals import cluster_bootstrap, group_weights
from cellcls.reports.ood import ood_threshold
from cellcls.reports.plots import plot_risk_coverage
from cellcls.reports.trust import (
    abstain_threshold,
    prediction_sets,
    risk_coverage,
    scale,
    set_thresholds,
)

N_BINS = 15  # of the calibration error and the reliability diagram


def calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error (ECE): over `n_bins` equal-width bins of the top probability,
    the image-weighted mean gap |accuracy - mean confidence| (torchmetrics'
    `MulticlassCalibrationError`, norm "l1"). 0.0 without images."""
    if not len(labels):
        return 0.0
    metric = MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")
    value = metric(torch.as_tensor(np.asarray(probs)), torch.as_tensor(np.asarray(labels)).long())
    return float(value)


def calibration_error_ci(
    labels: np.ndarray, probs: np.ndarray, groups: Sequence[Any], n_bins: int = N_BINS
) -> list[float]:
    """The 95% interval over source cells of the calibration error (ECE, `n_bins` equal bins of
    the top probability), resampling cells as `cluster_bootstrap` does."""
    inverse, w = group_weights(labels, groups)
    confidence = probs.max(1).astype(np.float64)
    gap = (probs.argmax(1) == labels) - confidence
    edges = np.linspace(0, 1, n_bins + 1)  # as `reliability_bins`: 1.0 in the last bin
    index = np.clip(np.searchsorted(edges, confidence, "right") - 1, 0, n_bins - 1)
    g = w.shape[1]
    gaps = np.bincount(inverse * n_bins + index, gap, g * n_bins).reshape(g, n_bins)
    images = np.bincount(inverse, minlength=g)
    ece = np.abs(w[1:] @ gaps).sum(1) / (w[1:] @ images)
    low, high = np.percentile(ece, (2.5, 97.5))
    return [float(low), float(high)]


def share(values: np.ndarray, labels: np.ndarray, groups: Sequence[Any], classes: Sequence[str]):
    """The mean of per-image `values` with its interval over cells (and per class)."""
    ci = cluster_bootstrap(values, labels, groups, classes=classes)
    return ci["accuracy"], ci["accuracy_ci95"], ci["per_class_ci95"]


def trust_figures(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[Any] | None,
    evidence: dict[str, Any] | None,
    coverage: Sequence[float],
    abstain: Sequence[float],
    out_dir: Path,
    n_bins: int = N_BINS,
    ood: tuple[Sequence[float], np.ndarray] | None = None,
) -> dict[str, Any]:
    """metrics.json's `trust` part (docs/trust.md reads it), and `risk_coverage.png`.

    `probs` are the model's calibrated probabilities; without `evidence` (a model never
    calibrated, an ensemble) only the risk-coverage curve and its area are reported. Without
    `groups` there are no intervals. `ood`: the rates asked and each image's score of the
    evidence's OOD flag; every test image is of a training class, so what it flags is false."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    confidence, right = probs.max(1), probs.argmax(1) == labels
    kept, risk = risk_coverage(confidence, right)
    figures: dict[str, Any] = {"aurc": float(risk.mean())}
    plot_risk_coverage(kept, risk, out_dir / "risk_coverage.png")
    if evidence is None:
        return figures
    t = float(evidence["temperature"])
    figures |= {"temperature": t, "fitted_on": evidence["fitted_on"]}
    figures["heldout"] = {k: evidence[k] for k in ("n_images", "n_cells", "accuracy")}
    if groups is not None:
        raw = scale(probs, 1 / t)  # as the network gave them, before the temperature
        figures["calibration_error_uncalibrated"] = calibration_error(labels, raw, n_bins)
        figures["calibration_error_uncalibrated_ci95"] = calibration_error_ci(
            labels, raw, groups, n_bins
        )
        figures["calibration_error_ci95"] = calibration_error_ci(labels, probs, groups, n_bins)
    sets: dict[str, Any] = {}
    for level in coverage:
        for mondrian in (False, True):
            member = prediction_sets(probs, set_thresholds(evidence, level, mondrian))
            covered, size = member[np.arange(len(labels)), labels], member.sum(1)
            row: dict[str, Any] = {
                "coverage": float(covered.mean()),
                "mean_set_size": float(size.mean()),
            }
            if groups is not None:
                _, row["coverage_ci95"], per_class = share(covered, labels, groups, classes)
                _, row["mean_set_size_ci95"], _ = share(size, labels, groups, classes)
                row["per_class_coverage"] = {
                    c: {"coverage": float(covered[labels == i].mean()), "ci95": per_class.get(c)}
                    for i, c in enumerate(classes)
                    if (labels == i).any()
                }
            sets[f"{level:g}" + (" mondrian" if mondrian else "")] = row
    figures["conformal"] = sets
    chosen: dict[str, Any] = {}
    for accuracy in abstain:
        threshold = abstain_threshold(evidence, accuracy)
        keep = confidence >= threshold
        # None: no confidence gave that accuracy on the held-out cells (every image unsure).
        row = {"threshold": threshold if threshold < np.inf else None}
        row["coverage"] = float(keep.mean())
        row["accuracy"] = float(right[keep].mean()) if keep.any() else None
        if groups is not None:
            _, row["coverage_ci95"], _ = share(keep, labels, groups, classes)
            if keep.any():
                kept_groups = np.asarray(groups)[keep]
                _, row["accuracy_ci95"], _ = share(right[keep], labels[keep], kept_groups, classes)
        chosen[f"{accuracy:g}"] = row
    figures["abstain"] = chosen
    if ood is not None and "ood" in evidence:
        rates, values = ood
        flags: dict[str, Any] = {"score": evidence["ood"]["score"]}
        for rate in rates:
            threshold = ood_threshold(evidence["ood"], rate)
            flagged = values > threshold
            row = {"threshold": threshold if threshold < np.inf else None}
            row["false_flags"] = float(flagged.mean())
            if groups is not None:
                _, row["false_flags_ci95"], _ = share(flagged, labels, groups, classes)
            flags[f"{rate:g}"] = row
        figures["ood"] = flags
    return figures
