"""Out-of-distribution flags, learnt from held-out source cells, and how well they separate.

`ood_evidence` turns the scores of `cellcls.models.ood` (higher: less like the training images)
on grouped validation into the record the checkpoint keeps beside its other trust evidence: the
Gaussian of the `mahalanobis` score (fitted on the training images' features) and, per score,
one value per held-out *cell* (one image drawn per cell, as the conformal scores are).

The flag is a conformal outlier test (Bates et al. 2023): an image is flagged when its score is
above the ceil((1 - rate)(n + 1))-th smallest of the n held-out cells' scores. An image of a new
cell exchangeable with the held-out ones is then flagged with probability at most `rate`; what
it catches of images unlike the training set is measured, not guaranteed
(`python -m cellcls.ood`, docs/trust.md).

numpy and scikit-learn only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from cellcls.reports.intervals import N_RESAMPLES, group_weights
from cellcls.reports.intervals import _ci as ci95
from cellcls.reports.trust import SEED, conformal_quantile, one_per_group

# The score the flag uses: the best mean leave-one-class-out AUROC on held-out cells
# (docs/trust.md, "Out-of-distribution"), not chosen on TEST.
DEFAULT_SCORE = "mahalanobis"


def fit_gaussian(features: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    """Class means and the precision of one covariance shared by the classes, with Ledoit-Wolf
    shrinkage (the features outnumber some classes' cells). Plain lists, for checkpoints and
    metadata.json."""
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    means = np.stack([features[labels == c].mean(0) for c in range(k)])
    centred = features - means[labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {
        "means": np.round(means, 6).tolist(),
        "precision": precision.astype(np.float32).tolist(),
    }


def ood_evidence(
    scores: dict[str, np.ndarray],
    groups: Sequence[Any] | np.ndarray,
    gaussian: dict[str, Any],
    seed: int = SEED,
) -> dict[str, Any]:
    """The checkpoint's `trust["ood"]`: per score, one held-out value per cell."""
    picked = one_per_group(groups, seed)
    return {
        "score": DEFAULT_SCORE,
        "gaussian": gaussian,
        "cell_scores": {k: np.round(np.asarray(v)[picked], 6).tolist() for k, v in scores.items()},
    }


def ood_threshold(evidence: dict[str, Any], rate: float, score: str | None = None) -> float:
    """The score above which an image is flagged, so that at most `rate` of new in-distribution
    cells are (infinite when there are too few held-out cells for that rate)."""
    values = evidence["cell_scores"][score or evidence["score"]]
    return conformal_quantile(values, 1 - rate)


def auroc(
    inside: np.ndarray,
    outside: np.ndarray,
    weights_in: np.ndarray | None = None,
    weights_out: np.ndarray | None = None,
) -> np.ndarray:
    """Area under the ROC curve of telling `outside` scores (higher) from `inside` ones: the
    chance that an outside image scores above an inside one, ties counting half. With weights
    (R x images, one row per resample), one area per row."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    a = np.ones((1, len(inside))) if weights_in is None else weights_in
    b = np.ones((1, len(outside))) if weights_out is None else weights_out
    order = np.argsort(inside, kind="stable")
    cum = np.concatenate([np.zeros((len(a), 1)), np.cumsum(a[:, order], 1)], 1)
    lo = np.searchsorted(inside[order], outside, "left")
    hi = np.searchsorted(inside[order], outside, "right")
    below = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])
    return (b * below).sum(1) / (a.sum(1) * b.sum(1))


def separation(
    inside: np.ndarray,
    inside_labels: np.ndarray,
    inside_groups: Sequence[Any],
    outside: np.ndarray,
    outside_groups: Sequence[Any],
    threshold: float | None = None,
    n: int = N_RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """AUROC of `outside` against `inside` with its 95% interval over cells: in-distribution
    cells resampled within their class, outside groups (slides, images) independently, as
    `cellcls.reports.intervals` resamples. With a `threshold`, also the share of each side
    flagged (false flags inside, detections outside), with intervals."""
    inv_in, w_in = group_weights(inside_labels, inside_groups, n, seed)
    inv_out, w_out = group_weights(np.zeros(len(outside)), outside_groups, n, seed + 1)
    a, b = w_in[:, inv_in].astype(np.float64), w_out[:, inv_out].astype(np.float64)
    area = auroc(inside, outside, a, b)
    row: dict[str, Any] = {
        "auroc": float(area[0]),
        "auroc_ci95": ci95(area[1:]),
        "n_inside": len(inside),
        "n_outside": len(outside),
        "n_outside_groups": int(w_out.shape[1]),
    }
    if threshold is not None:
        for name, values, w in (("false_flags", inside, a), ("flagged", outside, b)):
            hit = (np.asarray(values) > threshold).astype(np.float64)
            rate = (w @ hit) / w.sum(1)
            row[name], row[f"{name}_ci95"] = float(rate[0]), ci95(rate[1:])
        row["threshold"] = threshold
    return row
