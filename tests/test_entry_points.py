"""Console scripts, Hydra's Compose API without `import cellcls`, and the config tree of a run."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cellcls.run.config_tree import print_config_tree
from tests.conftest import CONF_DIR, FAST, compose_run

ROOT = CONF_DIR.parent
# pyproject.toml's [project.scripts] table (tomllib is not in Python 3.10).
SCRIPTS = dict(
    re.findall(
        r'^(cellcls-[\w-]+) = "([\w.:]+)"$',
        (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0],
        re.M,
    )
)
# What pip's console-script wrapper runs: the entry point imported as a module, not as __main__.
CONSOLE_SCRIPT = """
import sys
from {module} import {function}
sys.argv[0] = {name!r}
sys.exit({function}())
"""


def entry_point(name: str):
    """The function console script `name` calls."""
    module, function = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def run_script(name: str, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """Run console script `name` (from pyproject.toml) as its installed wrapper would."""
    module, function = SCRIPTS[name].split(":")
    code = CONSOLE_SCRIPT.format(module=module, function=function, name=name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLCLS_", "HYDRA_"))}
    env["CELLCLS_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_console_scripts_point_at_the_entry_points() -> None:
    names = {"train", "eval", "predict", "export", "bench", "search", "summary"}
    assert {f"cellcls-{n}" for n in names} <= set(SCRIPTS)
    for name, target in SCRIPTS.items():
        module = name.removeprefix("cellcls-").replace("-", ".")  # bench-inference
        assert target.startswith(f"cellcls.{module}:")
        assert callable(entry_point(name))


@pytest.mark.slow
def test_every_hydra_script_finds_its_config(tmp_path: Path, synthetic_cache: Path) -> None:
    """Run as console scripts, the Hydra entry points still find conf/ (`--cfg job` prints it)."""
    hydra_scripts = [n for n in SCRIPTS if hasattr(entry_point(n), "__wrapped__")]  # hydra.main
    assert {"cellcls-train", "cellcls-eval", "cellcls-predict"} <= set(hydra_scripts)
    code = "import importlib, sys\n" + "".join(
        f"sys.argv = [{name!r}, '--cfg', 'job']\n"
        f"importlib.import_module({SCRIPTS[name].split(':')[0]!r}).main()\n"
        for name in hydra_scripts
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLCLS_", "HYDRA_"))}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in hydra_scripts:
        task = name.removeprefix("cellcls-").replace("-", "_")  # conf/bench_inference.yaml
        assert f"task_name: {task}\n" in result.stdout, name


@pytest.mark.slow
def test_cellcls_train_debug_fdr(tmp_path: Path, synthetic_cache: Path) -> None:
    """`cellcls-train debug=fdr`: prints and saves the config tree, and its test report covers
    the one batch it scored."""
    args = [*FAST, "data.n_train=8", "data.n_test=5", "debug=fdr", "hydra.run.dir=run"]
    result = run_script("cellcls-train", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    tree = (run / "config_tree.log").read_text()
    assert tree.startswith("CONFIG") and "fast_dev_run: true" in tree
    assert "num_classes: 4" in tree  # resolved (`${len:${data.classes}}` in the config)
    record = json.loads((run / "run.json").read_text())  # cellcls.run.record, at the end
    assert record["command"].startswith("python -m cellcls.train data=synthetic")
    assert record["machine"]["cores"] >= 1 and record["wall_s"] > 0
    assert "CONFIG" in result.stdout and "fast_dev_run: true" in result.stdout  # printed too
    report = json.loads((run / "metrics.json").read_text())
    assert (report["n_images"], report["n_split"]) == (16, 20)
    assert record["result"]["metrics.json"] == report  # the record holds the report itself
    assert "the first 16 of the 20 images of TEST" in result.stdout + result.stderr


def test_config_tree_resolves_what_it_can(tmp_path: Path) -> None:
    cfg = compose_run(["data.classes=[A,B,C]", "ckpt_path=???"], tmp_path)
    print_config_tree(cfg, tmp_path)
    tree = (tmp_path / "config_tree.log").read_text()
    branches = [line[4:] for line in tree.splitlines() if line[:4] in ("├── ", "└── ")]
    assert branches[:2] == ["task_name", "seed"] and {"data", "model", "trainer"} <= set(branches)
    assert "hydra" not in branches
    assert "num_classes: 3" in tree and f"default_root_dir: {tmp_path}" in tree
    assert "???" in tree  # a required setting not given yet is shown, not an error
    assert all(line == line.rstrip() for line in tree.splitlines())


@pytest.mark.slow
def test_compose_api_without_importing_cellcls(tmp_path: Path) -> None:
    """As in a notebook: Hydra's Compose API on conf/, then instantiate the model."""
    code = f"""
import sys
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

with initialize_config_dir(config_dir={str(CONF_DIR)!r}, version_base="1.3"):
    cfg = compose("train", overrides=["data.classes=[A,B,C]", "data.image_size=32"])
model = instantiate(cfg.model)
print(type(model).__name__, model.net.classifier[-1].out_features, cfg.trainer.precision)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLCLS_", "HYDRA_"))}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, classes, precision = result.stdout.split()
    assert (name, classes) == ("CellClassifier", "3") and precision.endswith(("-mixed", "-true"))
