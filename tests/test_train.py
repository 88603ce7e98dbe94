"""`python -m cellcls.train` end to end, as a user runs it, on generated data."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import FAST, run_module


def last_value(metrics_csv: Path, key: str) -> float:
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get(key)]
    assert rows, f"{key} not logged in {metrics_csv}"
    return float(rows[-1][key])


def test_train_learns_and_writes_outputs(tmp_path: Path, synthetic_cache: Path) -> None:
    args = [
        *FAST,
        "data.n_train=60",
        "data.n_test=15",
        "trainer.max_epochs=6",
        "hydra.run.dir=outputs/run",
    ]
    result = run_module("cellcls.train", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("epoch_*.ckpt"))) == 1  # the best one
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    metrics = run / "metrics.csv"
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss"):
        last_value(metrics, key)
    assert last_value(metrics, "test/acc") > 0.5, "no better than chance (0.25)"
    assert "Best checkpoint:" in result.stderr + result.stdout


def test_missing_data_is_one_clear_message(tmp_path: Path, synthetic_cache: Path) -> None:
    result = run_module("cellcls.train", ["data.root=no/such/folder"], tmp_path, synthetic_cache)
    assert result.returncode != 0
    assert "data.root 'no/such/folder' does not exist" in result.stderr
    assert "data=synthetic" in result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_one_folder_per_job(tmp_path: Path, synthetic_cache: Path) -> None:
    args = [
        "-m",
        *FAST,
        "data.n_train=8",
        "data.n_test=2",
        "trainer.max_epochs=1",
        "model.optimizer.lr=1e-3,1e-4",
    ]
    result = run_module("cellcls.train", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    lrs = []
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        last_value(sweep / job / "metrics.csv", "test/acc")
        lrs.append(last_value(sweep / job / "metrics.csv", "lr-Adam"))
    assert lrs == [1e-3, 1e-4]
    # Both jobs used the one dataset generated for these settings.
    dataset = synthetic_cache / "synthetic-8-2-seed0"
    assert len(list((dataset / "TRAIN" / "MONOCYTE").iterdir())) == 8
