"""The slow tier of tests/test_docs.py: every documented command runs, not only composes.

Each command of the docs' bash blocks runs in this process as `python -m cellcls.<name>` runs it
(Hydra's command line, cellcls's checks, the run record), shrunk (32-px images, one epoch, two
folds, one trial, `bench.n_images=16`) on a miniature in the layout it names: Kaggle's download
(`data.root=/path/to/blood-cells`, with `data.mean: auto`), `data=imagefolder` with the class
folders at the root (PBC) or in split folders (Raabin's Train/TestA/TestB). Placeholders
(`<run>`, `ckpt_path=...`, `inputs=DIR_OR_FILE`) become a run trained here on that layout. What
needs what this machine lacks (a GPU, SLURM, two DDP processes, the network) is listed in `SKIP`
with its reason, and composes in tests/test_docs.py.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from cellcls.data.generate import generate_dataset, render_cell
from tests.test_docs import COMMANDS, ENTRY, NOT_HYDRA, PLACEHOLDER

# Substring of a command -> why it does not run here.
SKIP = {
    "trainer=ddp": "DDP starts one process per device (tests/test_ddp.py runs it)",
    "hydra/launcher=slurm": "needs a SLURM cluster",
    "trainer.accelerator=gpu": "needs a GPU",
    "data.download=true": "downloads from Kaggle (tests/test_download.py, with a stand-in)",
    "weights=imagenet": "downloads pretrained weights",
    "logger=wandb": "needs a W&B account (tests/test_loggers.py runs it offline)",
    "cellcls.app": "serves until stopped (tests/test_app.py serves it and drives the page)",
}
# Settings set (or replaced) on every command of the train configs, to make it small.
SHRINK = {
    "data.image_size": "32",
    "data.batch_size": "8",
    "data.num_workers": "0",
    "trainer.max_epochs": "1",
    "trainer.accelerator": "cpu",
}
SYNTHETIC = {"data.n_train": "6", "data.n_test": "2", "data.copies": "2"}
BY_ENTRY = {
    "cv": {"data.folds": "2"},
    "search": {"hparams_search.n_trials": "1"},
    "bench": {"bench.n_images": "16", "bench.keras": "false"},
    "bench.inference": {"bench.n_images": "16"},
    "ood": {"ood.synthetic": "4", "ood.noise": "4"},
}
TRAIN_CONFIGS = {"train", "cv", "search", "bench", "ood"}
RUNS = [(w, c) for w, c in COMMANDS if ENTRY.match(c).group(1) not in NOT_HYDRA]


def skip_reason(command: str) -> str | None:
    return next((why for part, why in SKIP.items() if part in command), None)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A miniature of each documented layout (4 classes, 6 cells of one image each per class)."""
    base = tmp_path_factory.mktemp("layouts")
    tiny = generate_dataset(base / "tiny", 6, 2, progress=False)
    kaggle = base / "blood-cells"
    images = kaggle / "dataset2-master" / "dataset2-master" / "images"
    shutil.copytree(tiny / "TRAIN", images / "TRAIN")
    for split in ("TEST", "TEST_SIMPLE"):
        shutil.copytree(tiny / "TEST", images / split)
    slides = kaggle / "dataset-master" / "dataset-master" / "JPEGImages"  # the 640x480 originals
    slides.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        render_cell("NEUTROPHIL", rng, (640, 480))[0].save(slides / f"BloodImage_{i:05d}.jpg")
    flat = base / "PBC"
    shutil.copytree(tiny / "TRAIN", flat)
    split = base / "Raabin"
    shutil.copytree(tiny / "TRAIN", split / "Train")
    for name in ("TestA", "TestB"):
        shutil.copytree(tiny / "TEST", split / name)
    other = base / "other"
    shutil.copytree(tiny / "TEST", other / "MYTEST")
    return {"kaggle": kaggle, "flat": flat, "split": split, "other": other}


def run_main(name: str, args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m cellcls.<name> args` in this process; a refusal fails the test with its line."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [f"cellcls-{name}", *args])
    GlobalHydra.instance().clear()
    try:
        importlib.import_module(f"cellcls.{name}").main()
    except SystemExit as stop:
        if stop.code not in (None, 0):
            pytest.fail(f"python -m cellcls.{name} {shlex.join(args)}: {stop.code}")
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def trained(
    layouts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """The run folder of a shrunk default training on a layout, trained once."""
    runs: dict[str, Path] = {}
    data = {
        "kaggle": [f"data.root={layouts['kaggle']}"],
        "split": [
            "data=imagefolder",
            f"data.root={layouts['split']}",
            "data.train_split=Train",
            "data.split=TestA",
        ],
    }

    def get(layout: str) -> Path:
        if layout not in runs:
            out = tmp_path_factory.mktemp(f"trained-{layout}")
            args = [*data[layout], *(f"{k}={v}" for k, v in SHRINK.items())]
            with pytest.MonkeyPatch.context() as mp:
                run_main("train", [*args, f"hydra.run.dir={out}"], out, mp)
            runs[layout] = out
        return runs[layout]

    return get


def concrete(command: str, layouts: dict[str, Path], trained: Callable[[str], Path]) -> str:
    """The command with its placeholders and machine paths replaced by this test's files."""
    layout = "split" if "TestB" in command else "kaggle"
    roots = {
        "/path/to/blood-cells": layouts["kaggle"],
        "...": layouts["kaggle"],
        "/data/PBC_dataset_normal_DIB": layouts["flat"],
        "/data/Raabin-WBC": layouts["split"],
        "/other/set": layouts["other"],
    }
    for written, path in roots.items():
        command = command.replace(f"data.root={written}", f"data.root={path}")
    command = command.replace("=/path/to/blood-cells/", f"={layouts['kaggle']}/")
    needs_run = re.search(r"ckpt_path=(?!last\b)|<run>|a=|inputs=", command)
    if needs_run:
        run = trained(layout)
        ckpt = str(sorted((run / "checkpoints").glob("epoch_*.ckpt"))[-1])
        command = command.replace("ckpt_path=[A.ckpt,B.ckpt,C.ckpt]", f"ckpt_path=[{ckpt},{ckpt}]")
        command = re.sub(r"ckpt_path=(?!last\b|\[)\S+", f"ckpt_path={ckpt}", command)
        command = re.sub(r"outputs/\w+/runs/<\w+>", str(run), command)
        test = layouts["kaggle"] / "dataset2-master" / "dataset2-master" / "images" / "TEST"
        command = re.sub(r"inputs=(DIR_OR_FILE|DIR)\b", f"inputs={test}", command)
    name = ENTRY.match(command).group(1) or ENTRY.match(command).group(2)
    if name in {*TRAIN_CONFIGS, "groups"} and "data=" not in command and "data.root" not in command:
        command += f" data.root={layouts['kaggle']}"  # the README: add data.root=/path/to/...
    return PLACEHOLDER.sub("X", command)  # the rest (<date>_<time>): a plain name


def shrunk(name: str, args: list[str], out: Path) -> list[str]:
    """`args` with the SHRINK settings in place of the command's own values, and its folder."""
    wanted = dict(BY_ENTRY.get(name, {}))
    if name in TRAIN_CONFIGS:  # the bench times its own passes: max_epochs is refused there
        wanted |= {k: v for k, v in SHRINK.items() if name != "bench" or k != "trainer.max_epochs"}
    if "data=synthetic" in args:
        wanted |= SYNTHETIC
    if name in ("cv", "search") and any(a.startswith("data.folds=") for a in args):
        wanted["data.folds"] = "2"
    kept = [
        o.input_line
        for o in OverridesParser.create().parse_overrides(args)
        if o.key_or_group not in wanted and not o.key_or_group.startswith("hydra.run.dir")
    ]
    return [*kept, *(f"{k}={v}" for k, v in wanted.items()), f"hydra.run.dir={out}"]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "command"), RUNS, ids=[f"{w}: {c}" for w, c in RUNS])
def test_documented_command_runs(
    where: str,
    command: str,
    layouts: dict[str, Path],
    trained: Callable[[str], Path],
    tmp_path: Path,
    synthetic_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))
    words = shlex.split(concrete(command, layouts, trained))
    name = ENTRY.match(" ".join(words)).group(1) or ENTRY.match(" ".join(words)).group(2)
    args = words[3:] if words[0].startswith("python") else words[1:]
    multirun = "-m" in args or "--multirun" in args
    args = [a for a in args if a not in ("-m", "--multirun")]
    if "ckpt_path=last" in args:  # resume: the run trained here, in a copy of its folder
        resumed = tmp_path / "resumed"
        shutil.copytree(trained("kaggle"), resumed)
        args = [a for a in args if not a.startswith(("hydra.run.dir=", "trainer.max_epochs="))]
        args += ["trainer.max_epochs=2", "trainer.accelerator=cpu"]
        run_main(name, [*args, f"hydra.run.dir={resumed}"], tmp_path, monkeypatch)
        assert (resumed / "run.json").is_file()
        return
    for weights in ("resnet18.pth", "resnet18_tv.pth", "convnext_atto.pth"):
        if f"weights={weights}" in command:
            write_weights(tmp_path / weights)
    out = tmp_path / "run"
    args = shrunk(name, args, out)
    if multirun:
        args = ["-m", *[a for a in args if not a.startswith("hydra.run.dir=")]]
        args.append(f"hydra.sweep.dir={out}")
    run_main(name, args, tmp_path, monkeypatch)
    records = list(out.rglob("run.json"))
    assert records, f"{where}: `{command}` wrote no run record in {out}"


def write_weights(path: Path) -> None:
    """The weights file the docs save where there is a network, from an untrained network."""
    import timm
    import torch
    import torchvision

    if path.name == "resnet18_tv.pth":
        net = torchvision.models.resnet18()
    else:
        net = timm.create_model(path.stem)
    torch.save(net.state_dict(), path)
