"""`hydra/launcher=slurm` composes; the submitit path runs, here with submitit's local executor
(cellcls.cv's folds as parallel jobs: each in its own process, then pooled once)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, FAST, run_module

TINY = ["data.n_train=8", "data.n_test=2", "data.image_size=32", "trainer.max_epochs=1"]


def test_slurm_launcher_config() -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == 4 and launcher["timeout_min"] > 0
    assert "partition" in launcher


@pytest.mark.slow
def test_cv_folds_as_parallel_jobs_are_pooled_once(tmp_path: Path, synthetic_cache: Path) -> None:
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *FAST, *TINY]
    args += ["data.copies=2", "data.folds=2", "data.fold=0,1"]
    result = run_module("cellcls.cv", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "cv" / "multiruns").iterdir()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # one process per fold
    with (sweep / "summary.csv").open(newline="") as f:  # the sweep's summary, as for train -m
        jobs = list(csv.DictReader(f))
    assert sorted(r["data.fold"] for r in jobs) == ["0", "1"]
    assert {r["status"] for r in jobs} == {"completed"}
    for fold in (0, 1):
        assert (sweep / f"fold_{fold}" / "fold.json").is_file()
    metrics = json.loads((sweep / "cv_metrics.json").read_text())
    assert metrics["folds"] == 2 and len(metrics["test_fold_accuracy"]) == 2
    with (sweep / "oof_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({r["path"] for r in rows}) == 4 * 8  # every TRAIN image once
    assert {r["fold"] for r in rows} == {"0", "1"}
