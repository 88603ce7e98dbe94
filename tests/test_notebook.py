"""notebooks/colab.ipynb runs top to bottom, here on the CPU with generated data and tiny sizes;
its cells can be run again, stop on a failed command or a missing GPU, and hand Colab secrets on
to the training process."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "colab.ipynb"
# Appended to the notebook's options cell, as papermill would: no install, no download, no GPU.
TEST_OPTIONS = """
INSTALL = False
DATA = "synthetic"
EPOCHS = 1
TRAINER = "cpu"
EXTRA = "data.n_train=8 data.n_test=2 data.image_size=32 callbacks.progress_bar.refresh_rate=0"
"""
# `!cmd` does not raise when the command fails; IPython keeps its exit status in `_exit_code`.
CHECK_EXIT = '\nassert globals().get("_exit_code", 0) == 0, "a shell command failed"'
URL = "https://github.com/me/cellcls.git"
MINE = f'REPO = "{URL}"'
PIP = f'"{sys.executable}" -m pip install -q -e .'
SECRETS = {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0123456789abcdef"}
# A `python` (or `pip`) that is not the kernel's: first on PATH, it fails every command it runs.
WRONG_INTERPRETER = '#!/bin/sh\necho "$0: not the kernel\'s interpreter" >&2\nexit 1\n'


def cell(text: str, kind: str = "code") -> str:
    """The source of the one notebook cell of `kind` that contains `text`."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (source,) = [c.source for c in nb.cells if c.cell_type == kind and text in c.source]
    return source


def test_notebook_outputs_are_stripped() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...with the kernel's interpreter: a `python` or `pip` first on PATH fails every command."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (options,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    options.source += TEST_OPTIONS
    for code in nb.cells:
        if code.cell_type == "code" and "!" in code.source:
            code.source += CHECK_EXIT
    wrong = tmp_path / "wrong-bin"
    wrong.mkdir()
    for name in ("python", "python3", "pip", "pip3"):
        (wrong / name).write_text(WRONG_INTERPRETER)
        (wrong / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrong}{os.pathsep}{os.environ['PATH']}")  # the kernel's too
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))  # the kernel inherits it
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    assert (tmp_path / "outputs" / "colab" / "eval" / "metrics.json").is_file()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3


def run_cells(*sources: str, namespace: dict | None = None, fail: str = "") -> list[str]:
    """Run notebook cells as IPython would, in `namespace` (a kernel's variables, kept from one
    call to the next), recording shell commands and magics instead of running them; returns what
    they would have run, their {expressions} expanded as IPython does. Acts out what the install
    cell relies on: `git clone` makes the repo folder (and fails when it is there, as git does),
    `%cd` changes the working folder, and a command that contains `fail` exits 1 (`_exit_code`).
    """
    ran: list[str] = []
    namespace = {} if namespace is None else namespace

    def system(cmd: str) -> None:
        cmd = cmd.format_map(namespace)
        ran.append(cmd)
        namespace["_exit_code"] = int(bool(fail) and fail in cmd)
        if cmd.startswith("git clone") and not namespace["_exit_code"]:
            repo = Path(shlex.split(cmd)[-1])
            repo.mkdir()  # FileExistsError for a second clone into the same folder
            (repo / "pyproject.toml").touch()
            (repo / "cellcls").mkdir()  # the package folder, of the same name
            (repo / "cellcls" / "train.py").touch()

    def run_line_magic(name: str, line: str) -> None:
        line = line.format_map(namespace)
        ran.append(f"%{name} {line}")
        if name == "cd":
            os.chdir(line)

    shell = SimpleNamespace(system=system, run_line_magic=run_line_magic)
    namespace["get_ipython"] = lambda: shell
    exec(TransformerManager().transform_cell("\n".join(sources)), namespace)
    return ran


def test_notebook_stops_on_the_repo_placeholder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    intro = cell("placeholder", "markdown")
    options, install = cell("# Options"), cell("!git clone")
    assert "REPO" in intro
    with pytest.raises(SystemExit, match="Set REPO in the options cell"):
        run_cells(options, install)
    repo = Path.cwd() / "cellcls"
    assert run_cells(options, MINE, install)[0] == f'git clone -q {URL} "{repo}"'


def test_install_cell_runs_again_without_cloning_again_or_entering_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run twice in one kernel: one clone, one %cd by absolute path, never into cellcls/cellcls;
    a new kernel that starts in the repo neither clones nor changes folder either."""
    monkeypatch.chdir(tmp_path)
    options, install = cell("# Options"), cell("!git clone")
    repo = Path.cwd() / "cellcls"
    kernel: dict = {}
    first = run_cells(options, MINE, install, namespace=kernel)
    assert first == [f'git clone -q {URL} "{repo}"', f"%cd {repo}", PIP]
    assert Path.cwd() == repo
    assert run_cells(install, namespace=kernel) == [PIP]
    assert Path.cwd() == repo
    assert run_cells(options, MINE, install) == [PIP]  # a restarted kernel, already in the repo
    assert Path.cwd() == repo


@pytest.mark.parametrize(
    ("fail", "message"),
    [("git clone", "git clone of REPO failed"), ("pip install", r"pip install -e \. failed")],
)
def test_install_cell_stops_when_clone_or_pip_fails(
    fail: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()
    options, install = cell("# Options"), cell("!git clone")
    token_url = 'REPO = "https://me:TOKEN@github.com/me/cellcls.git"'
    with pytest.raises(SystemExit, match=message) as stop:
        run_cells(options, token_url, install, fail=fail)
    assert "TOKEN" not in str(stop.value) and "\n" not in str(stop.value)
    assert Path.cwd() == (here if fail == "git clone" else here / "cellcls")  # no %cd, or one


def test_gpu_cell_stops_without_a_gpu_for_trainer_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu = cell("torch.cuda.is_available()")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="Runtime → Change runtime type → T4 GPU") as stop:
        run_cells('TRAINER = "gpu"', gpu)
    assert 'TRAINER = "cpu"' in str(stop.value) and "\n" not in str(stop.value)
    run_cells('TRAINER = "cpu"', gpu)  # slowly, but it trains
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    run_cells('TRAINER = "gpu"', gpu)
    assert "Tesla T4" in capsys.readouterr().out


class SecretNotFoundError(Exception):
    """As google.colab.userdata raises when there is no such secret."""


class NotebookAccessError(Exception):
    """As google.colab.userdata raises when the notebook was not given access to the secret."""


def fake_colab(monkeypatch: pytest.MonkeyPatch, get: Callable[[str], str]) -> list[str]:
    """google.colab.userdata as on Colab, its secrets from `get`; returns the names asked for.
    The Kaggle variables are out of the environment until the end of the test."""
    asked: list[str] = []

    def ask(name: str) -> str:
        asked.append(name)
        return get(name)

    userdata = ModuleType("google.colab.userdata")
    userdata.SecretNotFoundError = SecretNotFoundError
    userdata.NotebookAccessError = NotebookAccessError
    userdata.get = ask
    colab = ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    for name in SECRETS:
        monkeypatch.setenv(name, "")  # so that the end of the test also undoes what the cell sets
        monkeypatch.delenv(name)
    return asked


def test_data_cell_puts_colab_secrets_into_the_environment_of_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_colab(monkeypatch, SECRETS.__getitem__)
    run_cells('DATA = "kaggle"', cell("DATA_ARGS ="))
    assert {name: os.environ.get(name) for name in SECRETS} == SECRETS


@pytest.mark.parametrize("error", [SecretNotFoundError, NotebookAccessError])
def test_data_cell_runs_without_colab_secrets(
    error: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    def get(name: str) -> str:
        raise error(name)

    asked = fake_colab(monkeypatch, get)
    kernel: dict = {}
    run_cells('DATA = "kaggle"', cell("DATA_ARGS ="), namespace=kernel)
    assert asked == list(SECRETS) and not any(name in os.environ for name in SECRETS)
    assert kernel["DATA_ARGS"] == "data.root=data/blood-cells data.download=true"


def test_notebook_downloads_with_cellcls_not_the_kaggle_cli() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = "\n".join(c.source for c in nb.cells)
    assert "kaggle datasets download" not in sources and "kaggle.json" not in sources
    namespace = {}
    code = TransformerManager().transform_cell('DATA = "kaggle"\n' + cell("DATA_ARGS ="))
    exec(code, namespace)  # not on Colab: no google.colab, no secrets, no error
    assert namespace["DATA_ARGS"] == "data.root=data/blood-cells data.download=true"
