"""A run stopped by SIGTERM mid-epoch resumes in its own folder and ends as planned."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cellcls.run.state import RngState
from cellcls.train import train
from tests.conftest import FAST, compose_run, epochs_logged, logged, run_module, stop_in

# A callback that sends this very process a real SIGTERM in the middle of an epoch.
KILLER = """
import os, signal
import lightning as L

class SigtermAt(L.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)
"""
# 40 images per class: 128 for training after the 20% split, 8 batches of 16 per epoch.
RUN = [*FAST, "data.n_train=40", "data.n_test=5", "trainer.max_epochs=3", "hydra.run.dir=run"]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume(in_tmp: Path, synthetic_cache: Path) -> None:
    """Stopped by a real SIGTERM in its own process; resumed in this one."""
    (in_tmp / "killer.py").write_text(KILLER)
    kill = ["+callbacks.kill._target_=killer.SigtermAt", "+callbacks.kill.epoch=1"]
    stopped = run_module(
        "cellcls.train", [*RUN, *kill, "+callbacks.kill.batch=2"], in_tmp, synthetic_cache
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Resume it with: python -m cellcls.train ckpt_path=last" in stopped.stdout
    last = in_tmp / "run" / "checkpoints" / "last.ckpt"
    # Only tensors and plain values: nothing needs allowing for weights_only loading.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 8 + 3)  # saved where it stopped
    metrics = in_tmp / "run" / "csv" / "metrics.csv"
    assert epochs_logged(metrics) == [0]
    before = logged(metrics)

    # Data and model settings come from the checkpoint; only the trainer's are repeated.
    resume = ["ckpt_path=last", "trainer.max_epochs=3", *FAST[2:]]
    train(compose_run(resume, in_tmp / "run"))
    assert torch.load(last, weights_only=True)["global_step"] == 3 * 8  # no batch lost or doubled
    assert epochs_logged(metrics) == [0, 1, 2]
    after = logged(metrics)
    assert after[: len(before)] == before  # the interrupted run's rows, then the resumed run's
    assert any("test/acc" in r for r in after)


@pytest.mark.slow
def test_ckpt_path_last_needs_the_run_folder(tmp_path: Path, synthetic_cache: Path) -> None:
    result = run_module("cellcls.train", [*FAST, "ckpt_path=last"], tmp_path, synthetic_cache)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "hydra.run.dir=<the run's folder>" in result.stderr


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.save(RngState().state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    RngState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


@pytest.mark.slow
def test_stopped_in_validation_resumes_and_validates_that_epoch(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C lands mid-validation as often as mid-training; resumed, nothing of the epoch's
    training is left to time, and the run must neither crash on that nor skip the validation."""
    run = [*FAST, "data.n_train=10", "data.n_test=2", "data.image_size=32", "data.batch_size=8"]
    run += ["trainer.max_epochs=3", "test=false"]
    with monkeypatch.context() as patch:
        stop_in(patch, "validation_step", epoch=1)
        with pytest.raises(SystemExit):
            train(compose_run(run, in_tmp / "run"))
    train(compose_run([*run, "ckpt_path=last"], in_tmp / "run"))
    assert epochs_logged(in_tmp / "run" / "csv" / "metrics.csv") == [0, 1, 2]
