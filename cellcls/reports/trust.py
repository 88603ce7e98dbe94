"""What a model's probabilities are worth, learnt from held-out source cells.

`heldout_evidence` turns the chosen checkpoint's probabilities on grouped validation (cells no
training image came from) into a small record stored in the checkpoint and every export:

- a **temperature** T (`fit_temperature`): probabilities become softmax(log p / T), T chosen by
  the lowest cross-entropy on the held-out images (Guo et al. 2017). One number, so accuracy
  and every image's ranking of the classes are unchanged;
- for **conformal prediction sets** (`set_thresholds`, `prediction_sets`), one nonconformity score
  1 - p(true class) per held-out *cell*, of one image drawn at random from it (seeded). Images of
  one cell are copies, not exchangeable draws; cells are. With one image per cell, a new image
  of a new cell, exchangeable with the held-out cells, has its class in its set with
  probability >= level (split conformal, Vovk et al. 2005; the subsampling method of Dunn,
  Wasserman and Ramdas 2022 for two-layer data). The class-conditional (Mondrian) variant holds
  that per true class, from that class's cells only: with few cells (monocytes) its threshold
  is infinite and the class joins every set, which is the honest answer;
- for **abstention** (`abstain_threshold`), each held-out image's top probability and whether it
  was right.

The checkpoint was chosen and T fitted on the same held-out cells, so the guarantee is not
exact; TEST's coverage, with its interval over cells, is the evidence (docs/trust.md).
numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SEED = 0  # of the one image drawn per cell
SCALE_RANGE = (1e-2, 1e2)  # of 1 / T searched


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities a network would give with its logits divided by T."""
    z = log_probabilities(probs) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T of the lowest mean cross-entropy of softmax(log p / T) on (`probs`, `labels`).

    The cross-entropy is convex in 1 / T, so a golden-section search over log(1 / T) in
    `SCALE_RANGE` finds it (to 1e-6 relative)."""
    z = log_probabilities(probs)
    true = z[np.arange(len(labels)), np.asarray(labels)]

    def nll(log_beta: float) -> float:
        b = math.exp(log_beta)
        zb = b * z
        top = zb.max(1)
        return float(np.mean(top + np.log(np.exp(zb - top[:, None]).sum(1)) - b * true))

    lo, hi = (math.log(v) for v in SCALE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-6:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return 1.0 / math.exp((lo + hi) / 2)


def one_per_group(groups: Sequence[Any] | np.ndarray, seed: int = SEED) -> np.ndarray:
    """The index of one image drawn at random from each group, in the groups' sorted order."""
    inverse = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    keys = np.random.default_rng(seed).random(len(inverse))
    order = np.lexsort((keys, inverse))  # by group, and at random within each
    starts = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]
    return order[starts]


def heldout_evidence(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    classes: Sequence[str],
    seed: int = SEED,
    temperature: float | None = None,
    fitted_on: str = "grouped validation (cells no training image came from)",
) -> dict[str, Any]:
    """The record the checkpoint keeps (module docstring): plain values, so it loads with
    `weights_only=True` and goes into metadata.json as it is. A given `temperature` is kept
    instead of fitted (1.0 for probabilities calibrated already, as `cellcls.cv`'s are)."""
    labels = np.asarray(labels)
    if temperature is None:
        temperature = fit_temperature(probs, labels)
    p = scale(probs, temperature)
    picked = one_per_group(groups, seed)
    right = p.argmax(1) == labels
    return {
        "temperature": round(temperature, 6),
        "fitted_on": fitted_on,
        "classes": list(classes),
        "n_images": len(labels),
        "n_cells": len(picked),
        "cell_scores": np.round(1 - p[picked, labels[picked]], 6).tolist(),
        "cell_labels": labels[picked].tolist(),
        "confidence": np.round(p.max(1), 6).tolist(),
        "correct": right.tolist(),
        "accuracy": float(right.mean()) if len(right) else 0.0,
    }


def conformal_quantile(scores: Sequence[float] | np.ndarray, level: float) -> float:
    """The ceil(level (n + 1))-th smallest of n scores; infinite when n is too small for it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil(level * (len(scores) + 1) - 1e-9)
    return float(scores[k - 1]) if k <= len(scores) else math.inf


def set_thresholds(evidence: dict[str, Any], level: float, mondrian: bool = False) -> np.ndarray:
    """Per class, the largest 1 - p(class) that keeps the class in a set of coverage `level`:
    one threshold for all (marginal) or, `mondrian`, each from its own class's cells."""
    scores, labels = np.asarray(evidence["cell_scores"]), np.asarray(evidence["cell_labels"])
    k = len(evidence["classes"])
    if not mondrian:
        return np.full(k, conformal_quantile(scores, level))
    return np.array([conformal_quantile(scores[labels == c], level) for c in range(k)])


def prediction_sets(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, K) booleans: class k is in image i's set when 1 - p_ik <= its threshold. The top
    class is always in, so no set is empty (this only adds coverage)."""
    probs = np.asarray(probs)
    member = (1 - probs) <= thresholds[None, :] + 1e-12
    member[np.arange(len(probs)), probs.argmax(1)] = True
    return member


def abstain_threshold(evidence: dict[str, Any], accuracy: float) -> float:
    """The lowest top probability t such that the held-out images at or above t were right at
    least `accuracy` of the time (infinite when no share of them was: every image unsure)."""
    confidence = np.asarray(evidence["confidence"], dtype=np.float64)
    right = np.asarray(evidence["correct"], dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    kept_accuracy = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    # Images tied in confidence are kept or dropped together: only the last of a tie counts.
    sorted_conf = confidence[order]
    last_of_tie = np.r_[sorted_conf[1:] != sorted_conf[:-1], True]
    ok = np.flatnonzero((kept_accuracy >= accuracy - 1e-12) & last_of_tie)
    return float(sorted_conf[ok[-1]]) if len(ok) else math.inf


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (share of images kept, most confident first) and risk (error rate of those kept)
    at every cut; their mean risk is the area under the curve (AURC)."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    wrong = 1 - np.asarray(correct, dtype=np.float64)[order]
    kept = np.arange(1, len(order) + 1)
    return kept / len(order), np.cumsum(wrong) / kept
