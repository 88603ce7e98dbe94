"""Intervals over source cells (cellcls.reports.intervals) on generated outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from cellcls.reports.intervals import (
    cells_mostly_right,
    cluster_bootstrap,
    paired_bootstrap,
    per_group,
)
from cellcls.reports.metrics import classification_metrics


def outcomes(n_groups: int, per: int = 10, k: int = 4, seed: int = 0):
    """(correct, labels, groups): `n_groups` cells of `per` images, cell g of class g % k, each
    cell with its own chance of being right (so cells differ, as real ones do)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per)
    labels = groups % k
    skill = rng.uniform(0.4, 1.0, n_groups)
    correct = rng.random(len(groups)) < skill[groups]
    return correct, labels, groups


def width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_interval_contains_the_estimate_and_narrows_with_more_cells() -> None:
    few, many = (cluster_bootstrap(*outcomes(n)) for n in (8, 200))
    for r in (few, many):
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert r["balanced_accuracy_ci95"][0] <= r["balanced_accuracy"]
        assert r["balanced_accuracy"] <= r["balanced_accuracy_ci95"][1]
    assert (few["n_groups"], many["n_groups"], many["n_resamples"]) == (8, 200, 2000)
    assert width(many["accuracy_ci95"]) < width(few["accuracy_ci95"]) / 2
    assert width(many["balanced_accuracy_ci95"]) < width(few["balanced_accuracy_ci95"]) / 2
    assert width(few["accuracy_ci95"]) > 0


def test_point_estimates_are_the_reports() -> None:
    correct, labels, groups = outcomes(12, k=3)
    probs = np.eye(3)[np.where(correct, labels, (labels + 1) % 3)]
    m = classification_metrics(labels, probs, ["A", "B", "C"])
    r = cluster_bootstrap(correct, labels, groups, classes=["A", "B", "C"])
    assert r["accuracy"] == pytest.approx(m["accuracy"])
    assert r["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])
    assert set(r["per_class_ci95"]) == {"A", "B", "C"}


def test_resampling_is_within_class() -> None:
    # Class 0: one cell (6 of 10 right); class 1: 10 cells of differing accuracy.
    correct, labels, groups = outcomes(10, k=1, seed=3)
    labels = labels + 1
    groups = groups + 1
    correct = np.r_[[True] * 6 + [False] * 4, correct]
    labels, groups = np.r_[[0] * 10, labels], np.r_[[0] * 10, groups]
    r = cluster_bootstrap(correct, labels, groups)
    assert r["per_class_ci95"][0] == [0.6, 0.6]  # always that one cell: no spread
    assert width(r["per_class_ci95"][1]) > 0.05
    assert r["n_groups"] == 11


def test_one_cell_per_class_leaves_nothing_to_resample() -> None:
    # Drawn across classes, some resamples would hold one cell twice and the other not at all.
    correct = [True] * 6 + [False] * 4 + [True] * 10
    r = cluster_bootstrap(correct, [0] * 10 + [1] * 10, [0] * 10 + [1] * 10)
    assert r["accuracy_ci95"] == [0.8, 0.8]
    low, high = r["balanced_accuracy_ci95"]
    assert low == high == pytest.approx(0.8)


def test_seeded_intervals_are_identical() -> None:
    data = outcomes(20)
    assert cluster_bootstrap(*data, seed=5) == cluster_bootstrap(*data, seed=5)
    assert cluster_bootstrap(*data, seed=5) != cluster_bootstrap(*data, seed=6)
    a, b = data[0], ~data[0]
    assert paired_bootstrap(a, b, *data[1:], seed=2) == paired_bootstrap(a, b, *data[1:], seed=2)


def test_names_and_strings_give_the_same_interval() -> None:
    correct, labels, groups = outcomes(16)
    names = np.array(["EOS", "LYM", "MON", "NEU"])
    by_index = cluster_bootstrap(correct, labels, groups, classes=list(names))
    by_name = cluster_bootstrap(correct, names[labels], [f"cell{g:03d}" for g in groups])
    assert by_index == by_name


def test_a_run_against_itself_differs_by_exactly_zero() -> None:
    correct, labels, groups = outcomes(30)
    r = paired_bootstrap(correct, correct, labels, groups)
    assert r["difference"] == r["balanced_difference"] == 0.0
    assert r["ci95"] == r["balanced_ci95"] == [0.0, 0.0]
    assert (r["n_images"], r["n_groups"]) == (300, 30)


def test_a_planted_difference_lies_in_the_paired_interval() -> None:
    correct_a, labels, groups = outcomes(60, seed=1)
    rng = np.random.default_rng(7)
    fixed = ~correct_a & (rng.random(len(correct_a)) < 0.5)  # B gets half of A's errors right
    correct_b = correct_a | fixed
    planted = fixed.sum() / len(correct_a)
    r = paired_bootstrap(correct_a, correct_b, labels, groups)
    assert r["difference"] == pytest.approx(planted)
    assert r["accuracy_b"] - r["accuracy_a"] == pytest.approx(planted)
    assert 0 < r["ci95"][0] <= planted <= r["ci95"][1]
    assert 0 < r["balanced_ci95"][0] <= r["balanced_difference"] <= r["balanced_ci95"][1]
    # Swapped, the difference and its interval change sign.
    back = paired_bootstrap(correct_b, correct_a, labels, groups)
    assert back["ci95"] == pytest.approx([-r["ci95"][1], -r["ci95"][0]])


def test_per_group_rows_and_cells_mostly_right() -> None:
    groups = [7, 5, 7, 5, 7, 9]
    labels = [1, 0, 1, 0, 0, 2]
    correct = [True, True, True, False, False, True]
    rows = per_group(groups, labels, correct, classes=["A", "B", "C"])
    assert rows == [
        {"group": 5, "class": "A", "images": 2, "accuracy": 0.5},
        {"group": 7, "class": "B", "images": 3, "accuracy": pytest.approx(2 / 3)},
        {"group": 9, "class": "C", "images": 1, "accuracy": 1.0},
    ]
    assert cells_mostly_right(rows) == pytest.approx(2 / 3)  # 0.5 is not mostly right
    assert cells_mostly_right([]) == 0.0


def test_one_group_per_image_is_required() -> None:
    with pytest.raises(ValueError, match="3 groups for 2 images"):
        cluster_bootstrap([True, False], [0, 1], [0, 1, 2])
