"""`logger=mlflow` and `logger=wandb` run offline and fill their local stores: the run's config,
its metrics and its report files."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from cellcls.core.errors import CellclsError
from cellcls.run.loggers import RunFiles
from cellcls.train import train
from tests.conftest import FAST, compose_run

TINY = [*FAST, "data.image_size=32", "data.n_train=8", "data.n_test=2", "trainer.max_epochs=1"]
REPORT = {"curves.png", "confusion_matrix.png", "errors.png", "reliability.png", "metrics.json"}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Nothing may reach a server: no telemetry, W&B offline with its own folders in tmp_path."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    for name, value in {"MODE": "offline", "SILENT": "true", "ERROR_REPORTING": "false"}.items():
        monkeypatch.setenv(f"WANDB_{name}", value)
    for name in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # finished here even if the test failed
        wandb.finish()


def test_run_files_are_sent_once_per_content(tmp_path: Path) -> None:
    files = RunFiles(tmp_path)
    (tmp_path / "curves.png").write_bytes(b"a")
    (tmp_path / "train.log").write_text("not a report file")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch\n")  # logged as metrics already
    assert [p.name for p in files.changed()] == ["curves.png"]
    assert files.changed() == []
    (tmp_path / "curves.png").write_bytes(b"b")
    (tmp_path / "metrics.json").write_text("{}")
    assert [p.name for p in files.changed()] == ["curves.png", "metrics.json"]


@pytest.mark.parametrize("option", ["mlflow", "wandb"])
def test_a_missing_tracker_is_one_line(
    option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, option, None)  # as if not installed
    cfg = compose_run([f"logger={option}"], tmp_path)
    with pytest.raises(InstantiationException) as raised:  # the entry point prints the cause
        instantiate(cfg.logger[option])
    cause = raised.value.__cause__
    assert isinstance(cause, CellclsError)
    assert str(cause) == (
        f'logger={option} needs {option}, which is not installed: pip install -e ".[{option}]"'
    )


def test_mlflow_store_is_the_folder_the_run_started_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow keeps one store per URI for the process: a relative one would send a run started
    from a second folder into the first folder's store."""
    pytest.importorskip("mlflow")
    from cellcls.run.loggers import MLFlowLogger

    stores = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        logger = MLFlowLogger(
            ".", "sqlite:///outputs/mlflow.db", artifact_location="outputs/mlruns"
        )
        stores.append((logger._tracking_uri, logger._artifact_location))
    assert stores == [
        (f"sqlite:///{tmp_path / n}/outputs/mlflow.db", str(tmp_path / n / "outputs" / "mlruns"))
        for n in ("a", "b")
    ]


@pytest.mark.slow
def test_mlflow_run_lands_in_the_shared_sqlite_store(in_tmp: Path, offline: None) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = in_tmp / "outputs" / "train" / "runs" / "r1"
    train(compose_run([*TINY, "logger=mlflow"], run_dir))
    client = MlflowClient("sqlite:///outputs/mlflow.db")  # as `mlflow ui` is told
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == str(run_dir)
    assert run.data.params["model/optimizer/lr"] == "0.0003"
    assert run.data.params["data/image_size"] == "32" and run.data.params["seed"] == "42"
    assert {"train/loss", "val/acc", "test/acc"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 1  # one epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert REPORT | {"predictions.csv"} <= artifacts
    assert not {"train.log", "csv"} & artifacts
    # The files are in outputs/mlruns, next to the store, not in the working folder.
    stored = {p.name for p in (in_tmp / "outputs" / "mlruns").rglob("*") if p.is_file()}
    assert stored >= REPORT and not (in_tmp / "mlruns").exists()
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the CSV logger still writes


@pytest.mark.slow
def test_wandb_run_is_written_offline_in_the_run_folder(in_tmp: Path, offline: None) -> None:
    import wandb

    run_dir = in_tmp / "run"
    cfg = compose_run([*TINY, "logger=wandb"], run_dir)
    train(cfg)
    run = wandb.run  # still open: the process's exit (or the next cellcls run) finishes it
    assert run is not None and run.offline and run.name == str(run_dir)
    assert run.config["model"]["optimizer"]["lr"] == 0.0003 and run.config["seed"] == 42
    assert 0 <= run.summary["test/acc"] <= 1
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    assert (folder / f"run-{run.id}.wandb").stat().st_size > 0
    saved = {p.name for p in (folder / "files").iterdir()}
    assert REPORT | {"predictions.csv"} <= saved and "train.log" not in saved
    # The next logger of this process starts a run of its own.
    second = instantiate(cfg.logger.wandb).experiment
    assert second.id != run.id and wandb.run is second
