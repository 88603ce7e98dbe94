"""notebooks/colab.ipynb runs top to bottom, here on the CPU with generated data and tiny sizes."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
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
