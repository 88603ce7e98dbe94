"""`trainer=ddp`: two CPU processes (gloo) write one run folder and one report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from cellcls.core.errors import CellclsError
from cellcls.train import check_ddp_launch
from tests.conftest import CONF_DIR, FAST, make_dm, run_module

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path, synthetic_cache: Path) -> None:
    # 36 TRAIN images (source cells of 5 copies), whole cells held out for validation: an odd
    # number of images, so the two processes' test shares are evened out with a repeated image
    # (data.split=val tests on the validation part).
    args = [*FAST, *DDP, "data.n_train=9", "data.n_test=2", "data.image_size=32"]
    args += ["trainer.max_epochs=2", "data.cache=disk", "data.split=val", "data.val_fraction=0.2"]
    result = run_module("cellcls.train", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()  # one folder, not one per rank
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and "last.ckpt" in ckpts, ckpts
    assert (run / "csv" / "metrics.csv").is_file() and (run / "curves.png").is_file()
    # Each validation image once, in the datamodule's order, whatever rank scored it.
    dm = make_dm(synthetic_cache / "synthetic-9-2-x5-seed0", val_fraction=0.2, seed=42)
    dm.setup("fit")
    n_val = len(dm.val_set)
    assert n_val % 2 == 1
    report = json.loads((run / "metrics.json").read_text())
    assert report["n_images"] == n_val
    with (run / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["path"] for r in rows}) == n_val
    assert all(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert "distributed_backend=gloo" in result.stderr + result.stdout


def test_ddp_refused_in_a_local_multirun() -> None:
    # Lightning would start the other processes by re-running `-m ...`: the whole sweep again.
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=DDP, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    with pytest.raises(CellclsError, match="not in a local multirun"):
        check_ddp_launch(cfg)
