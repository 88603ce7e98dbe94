"""data.download=true: Kaggle's dataset through kagglehub, with a stand-in for the download call.

The network is never used: `kagglehub.dataset_download` is replaced by a function that lays out a
local folder as Kaggle's archive unpacks, or fails as kagglehub does offline or without
credentials.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import kagglehub
import pytest
import requests
from kagglehub.clients import ColabClient
from kagglehub.exceptions import KaggleApiHTTPError

from cellcls.core.errors import CellclsError
from cellcls.data.download import HANDLE
from cellcls.train import train
from tests.conftest import FAST, compose_run, make_dm

NESTED = Path("dataset2-master", "dataset2-master", "images")


@pytest.fixture
def kaggle(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in for kagglehub.dataset_download; returns the calls it received."""
    calls: list[dict] = []

    def dataset_download(handle: str, path: str | None = None, **kw) -> str:
        calls.append({"handle": handle, "path": path, **kw})
        shutil.copytree(tiny_root, Path(kw["output_dir"]) / NESTED)
        return kw["output_dir"]

    monkeypatch.setattr(kagglehub, "dataset_download", dataset_download)
    return calls


def fail_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def dataset_download(*args, **kw) -> str:
        raise error

    monkeypatch.setattr(kagglehub, "dataset_download", dataset_download)


def test_download_when_the_data_is_missing(kaggle, tmp_path: Path, caplog) -> None:
    root = tmp_path / "data" / "blood-cells"
    dm = make_dm(root, download=True)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert kaggle == [
        {"handle": "paultimothymooney/blood-cells", "path": None, "output_dir": str(root)}
    ]
    said = caplog.text
    assert f"into {root}" in said and "KAGGLE_USERNAME" in said and "KAGGLE_KEY" in said
    dm.setup("fit")
    assert dm.split_root == root / NESTED
    make_dm(root, download=True).prepare_data()  # there now: not downloaded again
    assert len(kaggle) == 1


@pytest.fixture
def colab(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Inside Colab as kagglehub sees it: TBE_RUNTIME_ADDR set, so kagglehub's own
    DatasetColabCacheResolver answers and returns Colab's mounted copy, ignoring `output_dir`.
    Only its HTTP call to the Colab runtime is replaced: the mount is a local folder laid out as
    Kaggle's archive unpacks. Returns the mounted dataset's folder."""
    mount = tmp_path / "kaggle" / "input"
    shutil.copytree(tiny_root, mount / "blood-cells" / NESTED)
    monkeypatch.setenv("TBE_RUNTIME_ADDR", "127.0.0.1:9")  # never reached: post is replaced
    monkeypatch.setenv("COLAB_CACHE_MOUNT_FOLDER", str(mount))
    monkeypatch.delenv("DISABLE_COLAB_CACHE", raising=False)

    def post(self, data: dict, handle_path: str, resource_handle=None) -> dict:
        assert (data["owner"], data["dataset"]) == ("paultimothymooney", "blood-cells")
        return {"slug": "blood-cells"}

    monkeypatch.setattr(ColabClient, "post", post)
    return mount / "blood-cells"


def test_download_on_colab_links_the_cached_copy(colab: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "content" / "data" / "blood-cells"
    assert Path(kagglehub.dataset_download(HANDLE, output_dir=str(root))) == colab  # as on Colab
    assert not root.exists()
    dm = make_dm(root, download=True)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert root.is_symlink() and root.resolve() == colab.resolve()
    assert f"in {colab}" in caplog.text and f"data.root {root} now links to it" in caplog.text
    dm.setup("fit")
    assert dm.split_root == root / NESTED and len(dm.train_set) + len(dm.val_set) == 4 * 6
    make_dm(root, download=True).prepare_data()  # found at data.root: no second call


def test_no_download_unless_asked(kaggle, tmp_path: Path) -> None:
    dm = make_dm(tmp_path / "nowhere")
    with pytest.raises(CellclsError, match="Pass data.download=true to download"):
        dm.prepare_data()  # refused before any file is checked or written
    assert kaggle == []


@pytest.mark.slow
def test_train_downloads_the_data(
    kaggle, tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))
    for name in ("CELLCLS_DATA", "CELLCLS_ROOT"):
        monkeypatch.delenv(name, raising=False)
    args = [a for a in FAST if not a.startswith("data=")]
    cfg = compose_run([*args, "data.download=true", "debug=fdr"], tmp_path / "run")
    train(cfg)
    assert len(kaggle) == 1 and Path(kaggle[0]["output_dir"]) == Path("data", "blood-cells")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_split"] == 4 * 2


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (
            requests.ConnectionError("HTTPSConnectionPool(host='api.kaggle.com', port=443): ..."),
            ["Could not reach api.kaggle.com", "offline?", "data.root=<its", "data=synthetic"],
        ),
        ("401", ["Kaggle asks for credentials", "(HTTP 401)", "KAGGLE_USERNAME", "KAGGLE_KEY"]),
        (RuntimeError("disk quota exceeded"), ["failed: RuntimeError: disk quota exceeded"]),
    ],
)
def test_failed_download_is_one_line(
    error, words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if error == "401":
        response = requests.Response()
        response.status_code = 401
        error = KaggleApiHTTPError("401 Client Error.\n\nYou don't have permission", response)
    fail_with(monkeypatch, error)
    with pytest.raises(CellclsError) as err:
        make_dm(tmp_path / "blood-cells", download=True).prepare_data()
    msg = str(err.value)
    assert "\n" not in msg and "paultimothymooney/blood-cells" in msg
    for word in words:
        assert word in msg, msg


def test_download_refuses_a_folder_with_other_files(kaggle, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CellclsError, match="holds other files and not the dataset"):
        make_dm(tmp_path, download=True).prepare_data()
    assert kaggle == [] and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
