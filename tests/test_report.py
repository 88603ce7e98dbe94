"""Report metrics on a hand-checked example, and the files and figures written."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchmetrics.classification import MulticlassCalibrationError

from cellcls.core.errors import CellclsError
from cellcls.reports.metrics import (
    calibration_error,
    classification_metrics,
    format_table,
    reliability_bins,
    write_report,
)
from cellcls.reports.plots import plot_curves
from cellcls.run.callbacks import TestReport as Report  # (not a test class)

CLASSES = ["A", "B", "C"]


def one_hot_probs(preds: list[int], confidence: float = 0.8) -> np.ndarray:
    probs = np.full((len(preds), 3), (1 - confidence) / 2, dtype=np.float32)
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def test_metrics_match_hand_computed_values() -> None:
    # A: 2 images, 1 right; B: 2 images, both right, plus A's mistake; C: 1 image, right.
    labels = np.array([0, 0, 1, 1, 2])
    m = classification_metrics(labels, one_hot_probs([0, 1, 1, 1, 2]), CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["per_class"]["A"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert m["per_class"]["B"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["B"]["f1"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    assert m["loss"] == pytest.approx((-4 * np.log(0.8) - np.log(0.1)) / 5, rel=1e-6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert "balanced accuracy 0.8333" in format_table(m)


def test_absent_class_does_not_count_in_balanced_accuracy() -> None:
    m = classification_metrics(np.array([0, 1]), one_hot_probs([0, 0]), CLASSES)
    assert m["per_class"]["C"]["support"] == 0
    assert m["balanced_accuracy"] == pytest.approx(0.5)


def test_write_report_files(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"img{i}.jpeg"))
        Image.new("RGB", (32, 24), (40 * i, 0, 0)).save(paths[-1])
    labels, probs = np.array([0, 0, 1, 1, 2]), one_hot_probs([0, 2, 1, 0, 2])
    out = tmp_path / "report"
    write_report(out, paths, labels, probs, CLASSES, split="TEST", checkpoint="x.ckpt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "TEST" and metrics["checkpoint"] == "x.ckpt"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == paths
    assert [r["pred"] for r in rows] == ["A", "C", "B", "A", "C"]
    assert float(rows[1]["C"]) == pytest.approx(0.8)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    for name in ("confusion_matrix.png", "errors.png", "reliability.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert list(rows[0]) == ["path", "label", "pred", *CLASSES]  # no groups: no group column
    assert not (out / "per_group.csv").exists() and "accuracy_ci95" not in metrics
    assert metrics["calibration_error"] == pytest.approx(calibration_error(labels, probs))


def test_calibration_error_on_a_hand_checked_example() -> None:
    # Top probabilities 0.9 (right), 0.62 (wrong), 0.62 (right), 0.5 (right), in 15 bins:
    # 1/4 * |1 - 0.9| + 2/4 * |0.5 - 0.62| + 1/4 * |1 - 0.5| = 0.21.
    labels = np.array([0, 1, 2, 0])
    probs = np.array(
        [[0.9, 0.05, 0.05], [0.62, 0.3, 0.08], [0.1, 0.28, 0.62], [0.5, 0.3, 0.2]],
        dtype=np.float32,
    )
    torchmetrics_ece = MulticlassCalibrationError(3, n_bins=15, norm="l1")(
        torch.from_numpy(probs), torch.from_numpy(labels)
    )
    assert calibration_error(labels, probs) == pytest.approx(0.21, abs=1e-6)
    assert calibration_error(labels, probs) == pytest.approx(float(torchmetrics_ece), abs=1e-7)
    assert classification_metrics(labels, probs, CLASSES)["calibration_error"] == pytest.approx(
        0.21, abs=1e-6
    )
    bins = reliability_bins(labels, probs)
    expected = np.zeros(15, dtype=int)
    expected[[7, 9, 13]] = [1, 2, 1]
    assert len(bins["edges"]) == 16 and bins["count"].tolist() == expected.tolist()
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"] - bins["confidence"])[filled] * bins["count"][filled] / 4
    assert gaps.sum() == pytest.approx(0.21, abs=1e-6)  # the diagram's bins are the metric's


def grouped_report(out: Path) -> tuple[dict, list[str]]:
    """write_report on 6 images of 3 cells (groups 10, 11, 12), two of them wrong."""
    paths = []
    for i in range(6):
        paths.append(str(out.parent / f"cell{i}.png"))
        Image.new("RGB", (16, 16), (0, 30 * i, 0)).save(paths[-1])
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = one_hot_probs([0, 0, 1, 0, 2, 1])
    groups = [10, 10, 11, 11, 12, 12]
    return write_report(out, paths, labels, probs, CLASSES, groups=groups, split="TEST"), paths


def test_write_report_with_groups(tmp_path: Path) -> None:
    out = tmp_path / "report"
    returned, paths = grouped_report(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned and metrics["split"] == "TEST"
    assert metrics["n_groups"] == 3
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["accuracy_ci95"] == pytest.approx([4 / 6, 4 / 6])  # one cell of each class
    assert metrics["balanced_accuracy_ci95"] == pytest.approx([4 / 6, 4 / 6])  # 1 cell a class
    assert metrics["cells_mostly_right"] == pytest.approx(1 / 3)  # cell 10 only: 11, 12 are 1/2
    rows = list(csv.DictReader((out / "per_group.csv").open()))
    assert [(r["group"], r["class"], r["images"]) for r in rows] == [
        ("10", "A", "2"),
        ("11", "B", "2"),
        ("12", "C", "2"),
    ]
    assert [float(r["accuracy"]) for r in rows] == [1.0, 0.5, 0.5]
    predictions = list(csv.DictReader((out / "predictions.csv").open()))
    assert list(predictions[0]) == ["path", "label", "pred", *CLASSES, "group"]
    assert [r["group"] for r in predictions] == ["10", "10", "11", "11", "12", "12"]
    assert [r["path"] for r in predictions] == paths
    with Image.open(out / "reliability.png") as im:
        assert im.format == "PNG" and im.size == (600, 700)


def test_format_table_shows_the_interval(tmp_path: Path) -> None:
    metrics, _ = grouped_report(tmp_path / "report")
    table = format_table(metrics)
    low, high = metrics["accuracy_ci95"]
    assert f"accuracy 0.6667 [{low:.3f}, {high:.3f}] over 3 cells" in table
    assert "balanced accuracy 0.6667 [0.667, 0.667]" in table
    assert f"ECE {metrics['calibration_error']:.4f}" in table
    assert "cells mostly right 0.333" in table
    plain = classification_metrics(np.array([0, 1]), one_hot_probs([0, 1]), CLASSES)
    assert "cells" not in format_table(plain) and "[" not in format_table(plain)


def test_errors_png_without_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    write_report(tmp_path, [str(path)], np.array([1]), one_hot_probs([1]), CLASSES)
    with Image.open(tmp_path / "errors.png") as im:
        assert im.format == "PNG"


def test_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train/loss": 1.2, "train/acc": 0.4, "val/loss": 1.1, "val/acc": 0.5},
        {"epoch": 2, "train/loss": 0.8, "train/acc": 0.7, "val/loss": 0.9, "val/acc": 0.6},
    ]
    plot_curves(history, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 400)


def run_test_report(
    out: Path, n: int, world_size: int, batches: int | None, report_groups=None
) -> None:
    """TestReport at the end of a test on `n` images, as rank 0 of `world_size` processes that
    each scored their first `batches` batches of 2 (None: all), through Lightning's sampler; the
    datamodule has `report_groups` when it is given."""
    paths = [f"img{i}.jpeg" for i in range(n)]
    # Image i is of class i % 3 and predicted so; its probability of class A encodes i.
    labels = torch.arange(n) % 3
    probs = torch.full((n, 3), 0.1)
    probs[torch.arange(n), labels] = 0.7
    probs[:, 0] += torch.arange(n) / 1000
    shares = []
    for rank in range(world_size):
        order = list(DistributedSampler(range(n), world_size, rank, shuffle=False))
        order = order[: 2 * batches] if batches else order
        shares.append((probs[order], labels[order]))
    report = Report(out)
    report.on_test_epoch_start(None, None)
    for i in range(0, len(shares[0][0]), 2):  # rank 0's batches
        outputs = {"probs": shares[0][0][i : i + 2], "labels": shares[0][1][i : i + 2]}
        report.on_test_batch_end(None, None, outputs, None, i // 2)
    dm = SimpleNamespace(test_paths=paths, hparams=SimpleNamespace(split="TEST"), root=".")
    if report_groups is not None:
        dm.report_groups = report_groups
    trainer = SimpleNamespace(world_size=world_size, is_global_zero=True, datamodule=dm)
    trainer.ckpt_path = None

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([share[0 if t.is_floating_point() else 1] for share in shares])

    module = SimpleNamespace(classes=CLASSES, device=torch.device("cpu"), all_gather=all_gather)
    report.on_test_epoch_end(trainer, module)


@pytest.mark.parametrize(
    ("world_size", "batches", "scored"),
    [(1, None, 7), (1, 2, 4), (2, None, 7), (2, 1, 4), (2, 3, 7), (3, 1, 6)],
)
def test_report_covers_exactly_the_scored_images(
    tmp_path: Path, caplog, world_size: int, batches: int | None, scored: int
) -> None:
    with caplog.at_level(logging.WARNING):
        run_test_report(tmp_path, 7, world_size, batches)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["n_images"], metrics["n_split"]) == (scored, 7)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [f"img{i}.jpeg" for i in range(scored)]
    assert all(r["label"] == r["pred"] == CLASSES[i % 3] for i, r in enumerate(rows))
    limited = [r.getMessage() for r in caplog.records if "Testing was limited" in r.message]
    assert bool(limited) == (scored < 7)
    if limited:
        assert f"the first {scored} of the 7 images of TEST" in limited[0]
    assert ("of the split's 7" in format_table(metrics)) == (scored < 7)


def test_report_asks_the_datamodule_for_groups(tmp_path: Path) -> None:
    asked = []

    def report_groups(paths: list[str]) -> list[int]:
        asked.append(list(paths))
        return [int(p.removeprefix("img").removesuffix(".jpeg")) // 2 for p in paths]

    run_test_report(tmp_path, 7, 2, 1, report_groups)  # 4 of the 7 images scored
    assert asked == [[f"img{i}.jpeg" for i in range(4)]]  # the scored images only, in order
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_groups"] == 2 and metrics["accuracy_ci95"] == [1.0, 1.0]
    rows = list(csv.DictReader((tmp_path / "per_group.csv").open()))
    assert [(r["group"], r["images"]) for r in rows] == [("0", "2"), ("1", "2")]


def test_report_lets_a_grouping_error_through(tmp_path: Path) -> None:
    def report_groups(paths: list[str]) -> list[int]:
        raise CellclsError("no sources.csv")

    with pytest.raises(CellclsError, match="no sources.csv"):
        run_test_report(tmp_path, 4, 1, None, report_groups)
