"""cellcls.reports.trust: each guarantee checked where the truth is known (generated scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellcls.reports.trust import (
    abstain_threshold,
    conformal_quantile,
    fit_temperature,
    heldout_evidence,
    one_per_group,
    prediction_sets,
    risk_coverage,
    scale,
    set_thresholds,
)
from cellcls.reports.trust_figures import calibration_error

CLASSES = ["A", "B", "C", "D"]


def cells(rng: np.random.Generator, n_cells: int, copies: int, sharp: float = 1.0):
    """Probabilities, labels and cells of `copies` images per cell: each cell has its own
    logits (its true class drawn from them, so softmax(logits) is calibrated), and its images
    are copies with a little noise. `sharp` > 1 makes the model overconfident by that factor."""
    z = rng.normal(size=(n_cells, 4)) * 2.5
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in p_true])
    z = np.repeat(z, copies, 0) + rng.normal(scale=0.3, size=(n_cells * copies, 4))
    p = np.exp(sharp * z)
    return (
        p / p.sum(1, keepdims=True),
        np.repeat(labels, copies),
        np.repeat(np.arange(n_cells), copies),
    )


def test_temperature_undoes_overconfidence_and_keeps_every_prediction() -> None:
    rng = np.random.default_rng(0)
    probs, labels, _ = cells(rng, 3000, 1, sharp=2.0)
    t = fit_temperature(probs, labels)
    assert 1.8 < t < 2.2
    fixed = scale(probs, t)
    assert (fixed.argmax(1) == probs.argmax(1)).all()
    assert calibration_error(labels, fixed) < calibration_error(labels, probs) / 2
    assert np.allclose(scale(fixed, 1 / t), probs, atol=1e-9)  # T undone by 1 / T


def test_one_image_is_drawn_from_each_cell() -> None:
    groups = np.repeat([7, 3, 9], [4, 1, 5])
    picked = one_per_group(groups, seed=1)
    assert sorted(groups[picked].tolist()) == [3, 7, 9]
    drawn = {int(one_per_group(groups, seed=s)[2]) for s in range(20)}  # cell 9: images 5-9
    assert len(drawn) > 1 and drawn <= {5, 6, 7, 8, 9}


def test_conformal_quantile_is_the_finite_sample_rank() -> None:
    scores = np.arange(1, 20) / 20  # 19 scores
    assert conformal_quantile(scores, 0.9) == pytest.approx(0.9)  # ceil(0.9 * 20) = 18th
    assert math.isinf(conformal_quantile(scores[:5], 0.9))  # 5 scores cannot give 90%


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_sets_cover_new_cells_at_the_asked_level(level: float) -> None:
    """Calibrated on 40 cells of 8 copies each, tested on 300 new cells, 300 times: the mean
    coverage lies between the level and level + 1/(n+1), within its binomial error."""
    rng = np.random.default_rng(1)
    coverage = []
    for _ in range(300):
        probs, labels, groups = cells(rng, 40, 8)
        evidence = heldout_evidence(probs, labels, groups, CLASSES, seed=int(rng.integers(1e9)))
        test_p, test_y, _ = cells(rng, 300, 1)
        sets = prediction_sets(
            scale(test_p, evidence["temperature"]), set_thresholds(evidence, level)
        )
        coverage.append(sets[np.arange(len(test_y)), test_y].mean())
    mean, error = np.mean(coverage), 3 * np.std(coverage) / math.sqrt(len(coverage))
    assert level - error <= mean <= level + 1 / 41 + error


def test_mondrian_covers_each_class_and_a_class_of_few_cells_joins_every_set() -> None:
    rng = np.random.default_rng(2)
    probs, labels, groups = cells(rng, 200, 3)
    rare = np.flatnonzero(labels == 3)
    keep = np.r_[np.flatnonzero(labels != 3), rare[: 3 * 5]]  # 5 cells of class D
    evidence = heldout_evidence(probs[keep], labels[keep], groups[keep], CLASSES)
    thresholds = set_thresholds(evidence, 0.95, mondrian=True)
    assert math.isinf(thresholds[3]) and np.isfinite(thresholds[:3]).all()
    test_p, test_y, _ = cells(rng, 2000, 1)
    sets = prediction_sets(test_p, thresholds)
    assert sets[:, 3].all()
    for c in range(3):
        assert sets[test_y == c, c].mean() > 0.95 - 0.03


def test_sets_are_never_empty_and_grow_with_the_level() -> None:
    rng = np.random.default_rng(3)
    probs, labels, groups = cells(rng, 100, 2)
    evidence = heldout_evidence(probs, labels, groups, CLASSES)
    small = prediction_sets(probs, set_thresholds(evidence, 0.5))
    large = prediction_sets(probs, set_thresholds(evidence, 0.95))
    assert small.sum(1).min() >= 1 and (large >= small).all() and large.sum() > small.sum()


def test_abstention_keeps_the_confident_images_at_the_asked_accuracy() -> None:
    rng = np.random.default_rng(4)
    probs, labels, groups = cells(rng, 500, 1)
    evidence = heldout_evidence(probs, labels, groups, CLASSES)
    confidence, right = np.array(evidence["confidence"]), np.array(evidence["correct"])
    t = abstain_threshold(evidence, 0.95)
    assert right[confidence >= t].mean() >= 0.95 and (confidence >= t).mean() < 1
    below = confidence[confidence < t].max()  # the lowest such t: one step lower falls short
    assert right[confidence >= below].mean() < 0.95
    assert math.isinf(abstain_threshold({"confidence": [0.9, 0.8], "correct": [False, True]}, 1.0))


def test_risk_coverage_ends_at_the_error_rate() -> None:
    coverage, risk = risk_coverage(np.array([0.9, 0.6, 0.8, 0.7]), np.array([1, 0, 1, 0]))
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == [0.0, 0.0, 1 / 3, 0.5]
