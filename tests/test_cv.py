"""Cross-validation by source cell: folds of whole groups, and `python -m cellcls.cv` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cellcls.core.errors import CellclsError
from cellcls.cv import cross_validate
from cellcls.data.generate import generate_dataset
from cellcls.data.splits import fold_indices
from tests.conftest import FAST, compose_run, epochs_logged, make_dm, split_groups, stop_in


def test_folds_validate_every_group_once_and_never_split_one() -> None:
    groups = np.repeat(np.arange(40), 5)  # 40 groups of 5 images, 10 groups per class
    labels = np.repeat(np.arange(4), 50)
    seen = np.zeros(len(groups), dtype=int)
    for fold in range(5):
        train, val = fold_indices(groups, labels, 5, fold, seed=3)
        assert not set(groups[train]) & set(groups[val])
        assert sorted(train + val) == list(range(len(groups)))
        assert set(labels[val]) == {0, 1, 2, 3}  # stratified: every class in every fold
        assert 30 <= len(val) <= 50  # balanced in images
        seen[val] += 1
    assert (seen == 1).all()
    assert fold_indices(groups, labels, 5, 2, seed=3) == fold_indices(groups, labels, 5, 2, 3)
    assert fold_indices(groups, labels, 5, 2, seed=3) != fold_indices(groups, labels, 5, 2, 4)


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 TRAIN and 2 TEST images per class: 4 and 1 source cells of 2 copies each."""
    return generate_dataset(tmp_path_factory.mktemp("cv") / "d", 8, 2, copies=2, progress=False)


def test_datamodule_folds_partition_train(cells: Path) -> None:
    held_out = []
    for fold in range(3):
        dm = make_dm(cells, folds=3, fold=fold)
        dm.setup("fit")
        train, val = split_groups(dm)
        assert val and not train & val
        held_out += dm.val_set.indices
    assert sorted(held_out) == list(range(4 * 8))  # every TRAIN image held out exactly once


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"folds": 1}, "data.folds=1 is not accepted"),
        ({"folds": 3, "fold": 3}, "data.fold=3 is not accepted: data.fold must be an integer"),
        ({"folds": 3, "val_split": "random"}, "folds hold out whole source cells"),
    ],
)
def test_bad_fold_settings_are_one_line(cells: Path, kw: dict, words: str) -> None:
    with pytest.raises(CellclsError, match=words):
        make_dm(cells, **kw)


def test_more_folds_than_groups_is_refused(cells: Path) -> None:
    with pytest.raises(CellclsError, match=r"in 40 folds \(data.folds\)"):
        make_dm(cells, folds=40).setup("fit")


def test_pooling_refuses_folds_that_did_not_finish(in_tmp: Path) -> None:
    """K is data.folds, the user's (cv.folds once replaced it silently); nothing else is."""
    cfg = compose_run([*FAST, "data.folds=3"], in_tmp / "cv", "cv")
    with pytest.raises(CellclsError, match=r"fold\(s\) \[0, 1, 2\] of 3 .* did not finish"):
        cross_validate(cfg, train_missing=False)
    with pytest.raises(CellclsError, match="data.fold=3 is not accepted"):
        cross_validate(compose_run([*FAST, "data.folds=3", "data.fold=3"], in_tmp / "cv", "cv"))
    with pytest.raises(CellclsError, match="data.split='val' is not accepted: .* a test folder"):
        cross_validate(compose_run([*FAST, "data.split=val"], in_tmp / "cv", "cv"))
    with pytest.raises(
        CellclsError, match="ckpt_path=x.ckpt is cellcls.train's: cellcls.cv resumes"
    ):
        cross_validate(compose_run([*FAST, "ckpt_path=x.ckpt"], in_tmp / "cv", "cv"))


@pytest.mark.slow
def test_cv_pools_out_of_fold_and_tests_the_fold_ensemble(in_tmp: Path) -> None:
    args = [*FAST, "data.n_train=8", "data.n_test=2", "data.copies=2", "data.image_size=32"]
    args += ["trainer.max_epochs=2", "data.folds=2"]
    out = in_tmp / "cv"
    result = cross_validate(compose_run(args, out, "cv"))
    with (out / "oof_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    header = ["path", "group", "fold", "label", "predicted"]
    assert list(rows[0])[:5] == header and len(list(rows[0])) == 5 + 4
    assert len(rows) == len({r["path"] for r in rows}) == 4 * 8  # every TRAIN image once
    assert {r["fold"] for r in rows} == {"0", "1"}
    saved = json.loads((out / "cv_metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("n_groups", "oof_accuracy", "oof_balanced_accuracy", "calibration_error"):
        assert key in saved
    low, high = saved["oof_accuracy_ci95"]
    assert low <= saved["oof_accuracy"] <= high and saved["n_images"] == 32
    accuracy = np.mean([r["label"] == r["predicted"] for r in rows])
    assert saved["oof_accuracy"] == pytest.approx(accuracy)
    assert len(saved["fold_accuracy"]) == len(saved["test_fold_accuracy"]) == 2
    low, high = saved["test_ensemble_accuracy_ci95"]
    assert low <= saved["test_ensemble_accuracy"] <= high
    for name in ("oof_confusion_matrix.png", "oof_reliability.png", "cv.md"):
        assert (out / name).is_file(), name
    assert "pooled out of fold" in (out / "cv.md").read_text()
    # conformal.json: one score per TRAIN cell from the pooled OOF predictions; it calibrates
    # the fold ensemble's sets on TEST.
    conformal = json.loads((out / "conformal.json").read_text())
    assert conformal["n_cells"] == saved["n_groups"] == len(conformal["cell_scores"])
    assert conformal["n_images"] == 32 and conformal["temperature"] == 1.0
    assert set(saved["test_ensemble_conformal"]) == {"0.9", "0.9 mondrian", "0.95", "0.95 mondrian"}
    ensemble = json.loads((out / "test_ensemble" / "metrics.json").read_text())
    assert ensemble["trust"]["fitted_on"].startswith("out-of-fold predictions of cellcls.cv")

    # Interrupted after fold 0: a second run keeps it and trains fold 1 again.
    kept = (out / "fold_0" / "fold.json").stat().st_mtime_ns
    (out / "fold_1" / "fold.json").unlink()
    again = cross_validate(compose_run([*args, "test=false"], out, "cv"))
    assert (out / "fold_0" / "fold.json").stat().st_mtime_ns == kept
    assert (out / "fold_1" / "fold.json").is_file() and "test_ensemble_accuracy" not in again


@pytest.mark.slow
def test_an_interrupted_cv_names_its_own_command_and_resumes_mid_fold(
    in_tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*FAST, "data.n_train=8", "data.n_test=2", "data.copies=2", "data.image_size=32"]
    args += ["trainer.max_epochs=2", "data.folds=2", "test=false", "data.batch_size=4"]
    out = in_tmp / "cv"
    with monkeypatch.context() as patch:
        stop_in(patch, "training_step", epoch=1, batch=1)
        with pytest.raises(SystemExit):
            cross_validate(compose_run(args, out, "cv"))
    hint = "Resume it with: python -m cellcls.cv data=synthetic "
    assert hint in caplog.text and f"hydra.run.dir={out.resolve()}" in caplog.text
    assert "python -m cellcls.train" not in caplog.text
    assert (out / "fold_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "fold_0" / "fold.json").exists()

    result = cross_validate(compose_run(args, out, "cv"))  # the command it named
    # Epoch 0 kept, epoch 1 resumed, neither run twice.
    assert epochs_logged(out / "fold_0" / "csv" / "metrics.csv") == [0, 1]
    assert result["n_images"] == 4 * 8 and (out / "fold_1" / "fold.json").is_file()
