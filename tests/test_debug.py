"""The debug/ config group, run in the test process through `cellcls.train.train`.

Every `model=`, `augment=`, `mix=` and `experiment=` option (found by listing conf/, so new ones
are covered) runs with `debug=fdr`; the others show what they promise: few batches, a loss driven
to near zero, a profile in the run folder. Each test report covers exactly the images it scored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cellcls.train import train
from tests.conftest import FAST, compose_run, last_value, options

OPTIONS = [f"{g}={o}" for g in ("model", "augment", "mix", "experiment") for o in options(g)]
# 8 TRAIN and 3 TEST images per class (source cells of 5 copies; whole cells held out for
# validation) and 12 for testing.
TINY = [*FAST, "data.n_train=8", "data.n_test=3", "data.image_size=32"]


@pytest.fixture
def run_dir(in_tmp: Path) -> Path:
    """A run folder, with the generated data in the shared cache, as run_module runs use."""
    return in_tmp / "run"


def report(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_fast_dev_run_of_every_option(option: str, run_dir: Path) -> None:
    cfg = compose_run([*TINY, option, "debug=fdr"], run_dir)
    assert cfg.task_name == "debug" and cfg.trainer.fast_dev_run
    metrics = train(cfg)
    assert "test/acc" in metrics
    scored = report(run_dir)
    # One test batch: the whole split when it is smaller than a batch (experiment=tutorial tests on
    # the 6 validation images).
    assert scored["n_images"] == min(cfg.data.batch_size, scored["n_split"])
    assert not (run_dir / "checkpoints").exists()  # fast_dev_run saves none


@pytest.mark.slow
def test_limit_test_batches(run_dir: Path) -> None:
    args = [*TINY, "data.batch_size=4", "trainer.max_epochs=1", "++trainer.limit_test_batches=2"]
    train(compose_run(args, run_dir))
    scored = report(run_dir)
    assert (scored["n_images"], scored["n_split"]) == (8, 12)
    assert last_value(run_dir / "csv" / "metrics.csv", "test/acc") == pytest.approx(
        scored["accuracy"]
    )


@pytest.mark.slow
def test_debug_limit_runs_a_few_batches(run_dir: Path) -> None:
    # 16 TRAIN images per class: more than 10 batches of 2 after the validation cells.
    cfg = compose_run([*TINY, "data.n_train=16", "data.batch_size=2", "debug=limit"], run_dir)
    train(cfg)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 3 * 10)  # 3 epochs of 10 batches
    assert report(run_dir)["n_images"] == 5 * 2  # limit_test_batches=5


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_to_near_zero(run_dir: Path) -> None:
    # Quicker than the config's 30 epochs at 3e-4 on this shared 2-core CPU: 3 batches of
    # distinct generated cells (copies=1), learning rate 1e-3.
    quick = ["trainer.max_epochs=12", "model.optimizer.lr=1e-3", "~callbacks.training_curves"]
    data = ["data.n_train=16", "data.copies=1", "data.val_split=random"]
    cfg = compose_run([*TINY, *data, "debug=overfit", *quick], run_dir)
    assert cfg.trainer.overfit_batches == 3 and not cfg.test
    train(cfg)
    with (run_dir / "csv" / "metrics.csv").open() as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert len(losses) == 12 and losses[0] > 1 and losses[-1] < 0.05, losses
    assert not (run_dir / "metrics.json").exists()  # no test report


@pytest.mark.slow
def test_debug_profiler_writes_into_the_run_folder(run_dir: Path) -> None:
    train(compose_run([*TINY, "debug=profiler"], run_dir))
    profile = (run_dir / "fit-profile.txt").read_text()
    assert "FIT Profiler Report" in profile and "run_training_epoch" in profile
