"""Shared fixtures: tiny generated datasets and a runner for the Hydra entry points."""

from __future__ import annotations

import csv
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from cellcls.data.datamodule import ImageFolderDataModule
from cellcls.data.generate import generate_dataset
from cellcls.models.classifier import CellClassifier
from cellcls.run.cli import choices

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
# Small, fast runs: few images, small inputs, no progress bar redraws in captured output.
FAST = [
    "data=synthetic",
    "data.image_size=48",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar.refresh_rate=0",
]


def options(group: str) -> list[str]:
    """The choices of config group `group` (`_name.yaml` files are parts others extend)."""
    return choices(group)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 TRAIN and 2 TEST images per class in the Kaggle layout."""
    return generate_dataset(tmp_path_factory.mktemp("data") / "tiny", 6, 2, progress=False)


@pytest.fixture(scope="session")
def kaggle_root(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_root as Kaggle's download unpacks it: `dataset2-master/dataset2-master/images/` holds
    TRAIN, TEST and TEST_SIMPLE (one image of each TEST class), under `blood-cells/`."""
    root = tmp_path_factory.mktemp("kaggle") / "blood-cells"
    images = root / "dataset2-master" / "dataset2-master" / "images"
    for split in ("TRAIN", "TEST"):
        shutil.copytree(tiny_root / split, images / split)
    for folder in (images / "TEST").iterdir():
        (images / "TEST_SIMPLE" / folder.name).mkdir(parents=True)
        first = sorted(folder.iterdir())[0]
        shutil.copy(first, images / "TEST_SIMPLE" / folder.name / first.name)
    return root


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by the end-to-end runs, so each dataset is generated once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def in_tmp(tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working folder, for runs in the test process: the shared generated-data
    cache, and no data location from the environment."""
    for name in ("CELLCLS_ROOT", "CELLCLS_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_module(module: str, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a user would, in `cwd`, with its own cache folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLCLS_", "HYDRA_"))}
    env["CELLCLS_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path):
    """One short training run on generated data, shared by the train and eval tests."""
    cwd = tmp_path_factory.mktemp("trained")
    args = [
        *FAST,
        "data.n_train=60",
        "data.n_test=15",
        "data.copies=1",  # 60 distinct cells per class: enough to learn from in 6 short epochs
        "trainer.max_epochs=6",
        "hydra.run.dir=outputs/run",
    ]
    result = run_module("cellcls.train", args, cwd, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "outputs" / "run", result


def logged(metrics: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv, without their empty cells (columns may be added later)."""
    return [{k: v for k, v in r.items() if v} for r in csv.DictReader(metrics.open())]


def epochs_logged(metrics: Path) -> list[int]:
    """The epochs a metrics.csv holds a validation for, in order."""
    return [int(r["epoch"]) for r in logged(metrics) if "val/acc" in r]


def stop_in(monkeypatch: pytest.MonkeyPatch, step: str, epoch: int, batch: int = 0) -> None:
    """Make the classifier's `step` ("training_step", "validation_step") raise, at batch
    `batch` of epoch `epoch`, what Ctrl-C or Lightning's SIGTERM handler raise there."""
    original = getattr(CellClassifier, step)

    def stopped(self: CellClassifier, batch_: object, batch_idx: int) -> object:
        if (self.current_epoch, batch_idx) == (epoch, batch) and not self.trainer.sanity_checking:
            raise SIGTERMException
        return original(self, batch_, batch_idx)

    monkeypatch.setattr(CellClassifier, step, stopped)


def last_value(metrics_csv: Path, key: str) -> float:
    """The last value of `key` in a CSVLogger metrics file."""
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get(key)]
    assert rows, f"{key} not logged in {metrics_csv}"
    return float(rows[-1][key])


def make_dm(root: Path, **kw) -> ImageFolderDataModule:
    """A datamodule on `root` with small, fast settings; `kw` replaces any of them."""
    kw = {"classes": CLASSES, "image_size": 32, "batch_size": 4, "num_workers": 0} | kw
    return ImageFolderDataModule(root, **kw)


def split_groups(dm: ImageFolderDataModule) -> tuple[set[int], set[int]]:
    """The source groups of a set-up datamodule's training and validation parts."""
    groups = dm.source_groups(dm.hparams.train_split)
    samples = dm.train_set.dataset.samples
    train = {groups[samples[i][0]] for i in dm.train_set.indices}
    return train, {groups[samples[i][0]] for i in dm.val_set.indices}


def best_checkpoint(run: Path) -> Path:
    """The one best checkpoint (`epoch_*.ckpt`) of a run folder."""
    (best,) = (run / "checkpoints").glob("epoch_*.ckpt")
    return best


def compose_run(overrides: list[str], out_dir: Path, config_name: str = "train") -> DictConfig:
    """A config as `python -m cellcls.<config_name>` composes it, writing into `out_dir`, for
    calling that entry point's function (`cellcls.train.train`, ...) in the test process."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def write_png_bomb(path: Path, side: int = 16000) -> Path:
    """A black `side` x `side` RGB PNG: 3 MB on disk, 768 MB decoded at 16000. Written a row at a
    time, so the test never holds the image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    packer, row = zlib.compressobj(1), b"\0" * (1 + 3 * side)  # filter byte + RGB samples
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


# Run as `python -c PEAK_ANON <module> <args>`: the module as `python -m` runs it, then (however
# it ends) its peak private memory on stderr as `peak_anon_kb=N`. Private (RssAnon, sampled every
# 2 ms) and not ru_maxrss, which also counts the pages of torch's shared libraries that the page
# cache happens to hold (0.8 GB or 1.6 GB for the same run).
PEAK_ANON = """
import atexit, runpy, sys, threading, time
peak = [0]
def anon():
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("RssAnon:")).split()[1])
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
atexit.register(lambda: print(f"peak_anon_kb={max(peak[0], anon())}", file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
