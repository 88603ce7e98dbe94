"""Intervals over source cells: how far a figure would move with other cells of the same kinds.

TEST's 2,487 images are copies (augmentations) of only 71 source cells, so its images are not
independent draws: an interval over images would be far too narrow. Every interval here is one
fixed method, so that figures of different runs can be set side by side:

- a **cluster bootstrap** over source groups: `N_RESAMPLES` (2,000) resamples, each drawing as
  many groups as there are, with replacement, **within each class** (a group belongs to the class
  most of its images carry; ties go to the first class), so every resample keeps the test set's
  mix of classes;
- each resample's figure is computed on all the images of the drawn groups (a group drawn twice
  counts twice);
- the 95% interval is the 2.5th and 97.5th percentiles of those figures (numpy's default, linear
  interpolation), from a seeded generator (`SEED`): the same inputs give the same interval.

numpy only. The resampling is vectorised: per-group sums of the correct images and of the images
of each class, one `rng.integers` call per class for all resamples, and one matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 2000
SEED = 0
PERCENTILES = (2.5, 97.5)


def _encode(
    labels: Sequence[Any] | np.ndarray, classes: int | Sequence[Any] | None
) -> tuple[np.ndarray, list[Any]]:
    """Labels as indices 0..K-1 and the K class names (or label values) they stand for.

    Integer labels index `classes` (names, or their number); other labels (names) are looked up in
    `classes`, or in their sorted distinct values when it is None."""
    labels = np.asarray(labels)
    if isinstance(classes, int | np.integer):
        classes = list(range(int(classes)))
    if labels.dtype.kind in "iub":
        labels = labels.astype(np.int64)
        k = max(len(classes) if classes is not None else 0, int(labels.max(initial=-1)) + 1)
        names = list(classes) if classes is not None else list(range(k))
        return labels, names + list(range(len(names), k))
    names = list(classes) if classes is not None else sorted(set(labels.tolist()))
    index = {c: i for i, c in enumerate(names)}
    return np.array([index[v] for v in labels.tolist()], dtype=np.int64), names


def _tables(
    labels: np.ndarray, groups: Sequence[Any] | np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct groups, each image's group index and the images of each class per group."""
    ids, inverse = np.unique(np.asarray(groups), return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(inverse) != len(labels):
        raise ValueError(f"{len(inverse)} groups for {len(labels)} images: give one per image")
    counts = np.bincount(inverse * k + labels, minlength=len(ids) * k).reshape(len(ids), k)
    return ids, inverse, counts


def _weights(group_class: np.ndarray, k: int, n: int, seed: int) -> np.ndarray:
    """(n, G): how many times each resample draws each group, drawing within each class."""
    rng = np.random.default_rng(seed)
    g = len(group_class)
    rows = np.arange(n)[:, None] * g
    draws = []
    for c in range(k):
        members = np.flatnonzero(group_class == c)
        if len(members):
            draws.append((rows + members[rng.integers(0, len(members), (n, len(members)))]).ravel())
    return np.bincount(np.concatenate(draws), minlength=n * g).reshape(n, g)


def _figures(
    w: np.ndarray, right: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample (rows of `w`): accuracy, balanced accuracy and per-class accuracy (NaN for a
    class with no image in that resample; balanced accuracy averages the classes present)."""
    hits, seen = w @ right, w @ counts  # (n, K) each
    accuracy = hits.sum(1) / seen.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.where(seen > 0, hits / seen, np.nan)
    balanced = np.nanmean(per_class, 1)
    return accuracy, balanced, per_class


def _ci(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, PERCENTILES)
    return [float(low), float(high)]


def _prepare(
    correct: np.ndarray, labels: Any, groups: Any, classes: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Each group's correct images per class, its images per class, its class, and the names."""
    codes, names = _encode(labels, classes)
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    if len(correct) != len(codes):
        raise ValueError(f"{len(correct)} outcomes for {len(codes)} labels")
    k = len(names)
    ids, inverse, counts = _tables(codes, groups, k)
    right = np.bincount(inverse * k + codes, weights=correct, minlength=len(ids) * k)
    return right.reshape(len(ids), k), counts, counts.argmax(1), names


def cluster_bootstrap(
    correct: Sequence[bool] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n: int = N_RESAMPLES,
    seed: int = SEED,
    classes: int | Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Percentile 95% intervals of accuracy and balanced accuracy over source groups.

    `correct`, `labels` and `groups` hold one value per image (whether it was predicted right, its
    true class, its source group); `correct` may hold any number per image (a set's size): the
    figures are then its means. Integer labels index `classes` (their names or number; None:
    0..max); other labels are names. Groups are resampled with replacement within their class
    (module docstring). Returns `accuracy`, `balanced_accuracy` (the point estimates, on all
    images), `accuracy_ci95`, `balanced_accuracy_ci95` ([low, high]), `per_class_ci95` (class ->
    [low, high] of its accuracy: zero width for a class of one group), `n_groups`, `n_resamples`.
    """
    right, counts, group_class, names = _prepare(correct, labels, groups, classes)
    if not len(group_class):
        raise ValueError("no images to resample")
    # Row 0 draws every group once (the point estimate); the others are the resamples.
    w = np.vstack([np.ones(len(group_class)), _weights(group_class, len(names), n, seed)])
    accuracy, balanced, per_class = _figures(w, right, counts)
    per_class = per_class[1:]
    present = counts.sum(0) > 0
    return {
        "accuracy": float(accuracy[0]),
        "balanced_accuracy": float(balanced[0]),
        "accuracy_ci95": _ci(accuracy[1:]),
        "balanced_accuracy_ci95": _ci(balanced[1:]),
        "per_class_ci95": {
            names[c]: _ci(values[~np.isnan(values)]) if (~np.isnan(values)).any() else None
            for c in np.flatnonzero(present)
            for values in [per_class[:, c]]
        },
        "n_groups": len(group_class),
        "n_resamples": n,
    }


def group_weights(
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n: int = N_RESAMPLES,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's group index, and (n + 1, G) how often each resample draws each group (row 0:
    every group once), drawn as `cluster_bootstrap` draws them: for figures it does not compute."""
    codes, names = _encode(labels, None)
    _, inverse, counts = _tables(codes, groups, len(names))
    w = np.vstack([np.ones(len(counts)), _weights(counts.argmax(1), len(names), n, seed)])
    return inverse, w


def paired_bootstrap(
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n: int = N_RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """B − A in accuracy and balanced accuracy on the same images, with paired 95% intervals.

    Each resample draws one set of groups (as `cluster_bootstrap`, within class) and scores both
    A and B on it, so what the two share (the same hard cells) cancels out of the difference: the
    interval of a run compared with itself is exactly [0, 0]. Returns `difference`, `ci95`,
    `balanced_difference`, `balanced_ci95`, the accuracies of each (`accuracy_a`, ...),
    `n_images`, `n_groups` and `n_resamples`.
    """
    right_a, counts, group_class, names = _prepare(correct_a, labels, groups, None)
    right_b = _prepare(correct_b, labels, groups, None)[0]
    # Row 0 draws every group once (the point estimates); the others are the resamples.
    w = np.vstack([np.ones(len(group_class)), _weights(group_class, len(names), n, seed)])
    acc_a, bal_a, _ = _figures(w, right_a, counts)
    acc_b, bal_b, _ = _figures(w, right_b, counts)
    acc, bal = acc_b - acc_a, bal_b - bal_a
    return {
        "difference": float(acc[0]),
        "ci95": _ci(acc[1:]),
        "balanced_difference": float(bal[0]),
        "balanced_ci95": _ci(bal[1:]),
        "accuracy_a": float(acc_a[0]),
        "accuracy_b": float(acc_b[0]),
        "balanced_accuracy_a": float(bal_a[0]),
        "balanced_accuracy_b": float(bal_b[0]),
        "n_images": int(counts.sum()),
        "n_groups": len(group_class),
        "n_resamples": n,
    }


def per_group(
    groups: Sequence[Any] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    classes: int | Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per source group, in the groups' sorted order: `group`, `class` (the class most of
    its images carry, named by `classes` as in `cluster_bootstrap`), `images` and `accuracy` (the
    share of its images predicted right)."""
    right, counts, group_class, names = _prepare(correct, labels, groups, classes)
    ids = np.unique(np.asarray(groups))
    images, hits = counts.sum(1), right.sum(1)
    return [
        {
            "group": ids[i].item(),
            "class": names[group_class[i]],
            "images": int(images[i]),
            "accuracy": float(hits[i] / images[i]),
        }
        for i in range(len(ids))
    ]


def cells_mostly_right(rows: Sequence[dict[str, Any]]) -> float:
    """The share of source cells (`per_group` rows) whose images are mostly right (accuracy > 0.5).

    A REPORT metric, to read beside the image accuracy: it says whether the errors are spread over
    many cells or piled on a few. It is never a prediction rule: no image's prediction is changed
    or voted on by the other images of its cell (at prediction time a new image has no cell).
    """
    return float(np.mean([r["accuracy"] > 0.5 for r in rows])) if rows else 0.0
