"""notebooks/colab.ipynb runs top to bottom, here on the CPU with generated data and tiny sizes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
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


def test_notebook_outputs_are_stripped() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_top_to_bottom(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (options,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    options.source += TEST_OPTIONS
    for cell in nb.cells:
        if cell.cell_type == "code" and "!" in cell.source:
            cell.source += CHECK_EXIT
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))  # the kernel inherits it
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    assert (tmp_path / "outputs" / "colab" / "eval" / "metrics.json").is_file()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3


def run_cells(*sources: str) -> list[str]:
    """Run notebook cells as IPython would, recording shell commands and magics instead of
    running them; returns what they would have run."""
    ran: list[str] = []
    shell = SimpleNamespace(
        system=ran.append, run_line_magic=lambda name, line: ran.append(f"%{name} {line}")
    )
    code = TransformerManager().transform_cell("\n".join(sources))
    exec(code, {"get_ipython": lambda: shell})
    return ran


def test_notebook_stops_on_the_repo_placeholder() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    intro, options, install = nb.cells[0], nb.cells[1], nb.cells[3]
    assert "REPO" in intro.source and "placeholder" in intro.source
    with pytest.raises(SystemExit, match="Set REPO in the options cell"):
        run_cells(options.source, install.source)
    mine = 'REPO = "https://github.com/me/cellcls.git"'
    assert run_cells(options.source, mine, install.source)[0] == "git clone -q {REPO} cellcls"


def test_notebook_downloads_with_cellcls_not_the_kaggle_cli() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = "\n".join(c.source for c in nb.cells)
    assert "kaggle datasets download" not in sources and "kaggle.json" not in sources
    (data,) = [c for c in nb.cells if c.cell_type == "code" and "DATA_ARGS =" in c.source]
    namespace = {}
    code = TransformerManager().transform_cell('DATA = "kaggle"\n' + data.source)
    exec(code, namespace)
    assert namespace["DATA_ARGS"] == "data.root=data/blood-cells data.download=true"
