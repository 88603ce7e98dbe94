"""`python -m cellcls.train` end to end, as a user runs it, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.train import train
from tests.conftest import FAST, compose_run, last_value


@pytest.mark.slow
def test_train_learns_and_writes_outputs(trained_run) -> None:
    run, result = trained_run
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("epoch_*.ckpt"))) == 1  # the best one
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    metrics = run / "csv" / "metrics.csv"
    keys = ("train/loss", "train/acc", "train/img_s", "val/loss", "val/acc", "val/acc_best")
    for key in (*keys, "test/loss"):
        last_value(metrics, key)
    assert last_value(metrics, "test/acc") > 0.5, "no better than chance (0.25)"
    assert "Best checkpoint:" in result.stderr + result.stdout
    # The test phase's report and the training curves.
    report = json.loads((run / "metrics.json").read_text())
    assert report["split"] == "TEST" and report["n_images"] == 4 * 15
    assert report["val_split"] == "grouped"  # which validation chose the checkpoint
    assert report["accuracy"] == pytest.approx(last_value(metrics, "test/acc"), abs=1e-6)
    assert Path(report["checkpoint"]).name.startswith("epoch_")
    with Image.open(run / "curves.png") as im:
        assert im.size[0] > 300


@pytest.mark.slow
def test_train_calibrates_the_best_checkpoint_on_heldout_cells(trained_run) -> None:
    run, _ = trained_run
    report = json.loads((run / "metrics.json").read_text())
    ckpt = torch.load(report["checkpoint"], map_location="cpu", weights_only=True)
    trust = ckpt["trust"]
    assert trust["temperature"] == report["trust"]["temperature"] > 0
    assert trust["n_cells"] == len(trust["cell_scores"]) == len(trust["cell_labels"]) > 0
    assert trust["n_images"] == len(trust["confidence"]) >= trust["n_cells"]
    trust_report = report["trust"]
    assert set(trust_report["conformal"]) == {"0.9", "0.9 mondrian", "0.95", "0.95 mondrian"}
    for level in trust_report["conformal"].values():
        assert 0 <= level["coverage"] <= 1 and 1 <= level["mean_set_size"] <= 4
        lo, hi = level["coverage_ci95"]
        assert lo <= level["coverage"] <= hi
        assert set(level["per_class_coverage"]) == set(ckpt["hyper_parameters"]["classes"])
    assert set(trust_report["abstain"]) == {"0.95"}
    assert 0 <= trust_report["aurc"] <= 1
    with Image.open(run / "risk_coverage.png") as im:
        im.verify()


@pytest.mark.slow
def test_refit_trains_on_all_of_train_and_tests_the_last_epoch(in_tmp: Path) -> None:
    run = in_tmp / "run"
    args = [*FAST, "data.n_train=8", "data.n_test=3", "data.image_size=32"]
    cfg = compose_run([*args, "experiment=best_refit", "trainer.max_epochs=2"], run)
    metrics = train(cfg)
    assert "val/acc" not in metrics and "test/acc" in metrics  # no validation: nothing chosen
    report = json.loads((run / "metrics.json").read_text())
    assert report["val_split"].startswith("none") and report["n_images"] == 4 * 3
    assert Path(report["checkpoint"]).name == "epoch_001.ckpt"  # the last of 2 epochs
    assert "val/acc" not in (run / "csv" / "metrics.csv").read_text()


@pytest.mark.slow
def test_missing_data_is_one_clear_message(in_tmp: Path) -> None:
    with pytest.raises(
        CellclsError, match="data.root 'no/such/folder' does not exist.*data=synthetic"
    ):
        train(compose_run(["data.root=no/such/folder"], in_tmp / "run"))


@pytest.mark.slow
def test_the_same_command_repeats_on_the_cpu(in_tmp: Path) -> None:
    """Same seed, same machine: the same test probabilities (to the report's 6 digits) and the
    same weights, with augmentation on as by default."""
    args = [*FAST, "data.n_train=8", "data.n_test=2", "data.image_size=32", "trainer.max_epochs=2"]
    runs = [in_tmp / name for name in ("a", "b")]
    for run in runs:
        train(compose_run(args, run))
    a, b = ((run / "predictions.csv").read_text() for run in runs)
    assert a == b and len(a.splitlines()) == 1 + 4 * 2
    weights = [torch.load(run / "checkpoints" / "last.ckpt")["state_dict"] for run in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
