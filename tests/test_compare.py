"""`python -m cellcls.compare a=A b=B`: paired differences between two runs' predictions."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellcls.compare import compare, main
from cellcls.reports.metrics import write_predictions
from tests.conftest import CLASSES, compose_run

PATHS = [f"TEST/{CLASSES[i % 4]}/img{i:02d}.jpeg" for i in range(40)]
LABELS = np.arange(40) % 4
GROUPS = np.arange(40) // 4  # 10 cells of 4 images; cell g holds one image of each class


def scored(folder: Path, wrong: list[int], paths=PATHS, groups=GROUPS, name="predictions.csv"):
    """A run folder whose predictions.csv gets the images in `wrong` wrong, the rest right."""
    preds = LABELS.copy()
    preds[wrong] = (preds[wrong] + 1) % 4
    folder.mkdir(parents=True, exist_ok=True)
    probs = np.eye(4, dtype=np.float32)[preds]
    write_predictions(folder / name, paths, probs, CLASSES, LABELS, groups)
    return folder


def run_compare(tmp_path: Path, a: Path, b: Path) -> dict:
    """`cellcls.compare`'s Hydra app in this process; its compare.json."""
    out = tmp_path / "compare"
    cfg = compose_run([f"a={a}", f"b={b}"], out, config_name="compare")
    main.__wrapped__(cfg)
    return json.loads((out / "compare.json").read_text())


def test_compare_two_runs_on_the_same_images(tmp_path: Path, caplog) -> None:
    a = scored(tmp_path / "a", wrong=list(range(0, 40, 3)))  # 14 wrong
    b = scored(tmp_path / "b", wrong=[0, 3, 6, 9, 12])  # 5 of A's errors, in 4 cells
    with caplog.at_level("INFO"):
        result = run_compare(tmp_path, a, b / "predictions.csv")  # a folder or its file
    assert result["difference"] == pytest.approx((14 - 5) / 40)
    assert result["ci95"][0] <= result["difference"] <= result["ci95"][1]
    assert result["balanced_ci95"][0] <= result["balanced_difference"]
    assert result["balanced_difference"] <= result["balanced_ci95"][1]
    assert (result["n_images"], result["n_groups"]) == (40, 10)
    assert (result["disagree_images"], result["disagree_groups"]) == (9, 7)
    assert result["a"] == str(a / "predictions.csv") and result["b"] == str(b / "predictions.csv")
    assert "They disagree on 9 of 40 images, in 7 of 10 cells." in caplog.text
    assert "B - A +0.2250" in caplog.text


def test_compare_a_cv_folder_with_a_run(tmp_path: Path) -> None:
    # cellcls.cv's layout: path, group, fold, label, predicted, one probability per class.
    cv = tmp_path / "cv"
    cv.mkdir()
    with (cv / "oof_predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group", "fold", "label", "predicted", *CLASSES])
        for i, (path, label, group) in enumerate(zip(PATHS, LABELS, GROUPS, strict=True)):
            pred = CLASSES[(label + (i in (1, 2, 3))) % 4]  # images 1-3 wrong
            writer.writerow([path, group, group % 5, CLASSES[label], pred, *[0.25] * 4])
    run = scored(tmp_path / "run", wrong=[1, 2, 3, 20])
    result = compare(cv, run)
    assert result["a"] == str(cv / "oof_predictions.csv")
    assert result["difference"] == pytest.approx(-1 / 40)
    assert (result["disagree_images"], result["disagree_groups"]) == (1, 1)
    itself = compare(cv, cv / "oof_predictions.csv")
    assert itself["difference"] == 0.0 and itself["ci95"] == [0.0, 0.0]
    assert itself["disagree_images"] == itself["disagree_groups"] == 0


def test_compare_refuses_other_images_in_one_line(tmp_path: Path) -> None:
    a = scored(tmp_path / "a", wrong=[])
    other = [p.replace("img", "other") for p in PATHS[:5]] + PATHS[5:]
    b = scored(tmp_path / "b", wrong=[], paths=other)
    with pytest.raises(SystemExit) as refused:
        run_compare(tmp_path, a, b)
    message = str(refused.value)
    assert message.startswith("error: ") and "\n" not in message
    assert str(b / "predictions.csv") in message and "other images" in message
    assert "5 of its 40 not in A" in message


def test_compare_refuses_files_without_groups(tmp_path: Path) -> None:
    a = scored(tmp_path / "a", wrong=[])
    old = scored(tmp_path / "old", wrong=[], groups=None)
    with pytest.raises(SystemExit) as refused:
        run_compare(tmp_path, a, old)
    message = str(refused.value)
    assert "\n" not in message and str(old / "predictions.csv") in message
    assert "no group column" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no predictions.csv or oof_predictions.csv"):
        run_compare(tmp_path, a, tmp_path / "empty")


def test_compare_refuses_other_groupings(tmp_path: Path) -> None:
    a = scored(tmp_path / "a", wrong=[])
    b = scored(tmp_path / "b", wrong=[], groups=np.arange(40) % 10)
    with pytest.raises(SystemExit, match="groups the images otherwise"):
        run_compare(tmp_path, a, b)


@pytest.mark.slow
def test_trained_run_reports_intervals_and_compares(trained_run, tmp_path, caplog):
    """A short train run's report has the intervals over cells, and compare takes its run
    folder: the run against itself differs by exactly zero."""
    run, result = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert 2 <= metrics["n_groups"] <= metrics["n_images"]
    low, high = metrics["accuracy_ci95"]
    assert low <= metrics["accuracy"] <= high
    assert 0 <= metrics["cells_mostly_right"] <= 1 and 0 <= metrics["calibration_error"] <= 1
    rows = list(csv.DictReader((run / "per_group.csv").open()))
    assert len(rows) == metrics["n_groups"]
    assert sum(int(r["images"]) for r in rows) == metrics["n_images"]
    predictions = list(csv.DictReader((run / "predictions.csv").open()))
    assert list(predictions[0])[-1] == "group"
    assert {r["group"] for r in predictions} == {r["group"] for r in rows}
    with Image.open(run / "reliability.png") as im:
        im.verify()
    assert f"over {metrics['n_groups']} cells" in result.stdout + result.stderr
    with caplog.at_level(logging.INFO):
        compared = run_compare(tmp_path, run, run)  # the app in this process: no second start-up
    assert compared["ci95"] == compared["balanced_ci95"] == [0.0, 0.0]
    assert compared["n_images"] == metrics["n_images"]
    assert "They disagree on 0 of" in caplog.text
