"""Loggers cellcls adds to Lightning's own: the appending CSV logger, and MLflow and W&B runs that
carry the run's config and its report files (`logger=mlflow`, `logger=wandb`)."""

from __future__ import annotations

import csv
import hashlib
import importlib
from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cellcls.core.errors import CellclsError


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but it keeps an existing metrics.csv and appends under its header."""

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; keep it, and its columns, instead.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class CSVLogger(LightningCSVLogger):
    """`<run>/csv/metrics.csv`, appended to and never deleted.

    A resumed run writes into the interrupted run's folder, so its epochs continue the same file.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def needs(module: str, logger: str) -> None:
    """Refuse `logger=<logger>` in one line when its package is not installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise CellclsError(
            f'logger={logger} needs {module}, which is not installed: pip install -e ".[{logger}]"'
        ) from None


class RunFiles:
    """The report files at the top of a run folder (the PNGs, metrics.json, predictions.csv, the
    other CSVs, config_tree.log) that are new or changed since the last call: what a tracker
    uploads when fit ends and when test ends, each content once."""

    PATTERNS = ("*.png", "*.json", "*.csv", "config_tree.log")

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.sent: dict[str, str] = {}

    def changed(self) -> list[Path]:
        found = sorted({p for pattern in self.PATTERNS for p in self.folder.glob(pattern)})
        new = []
        for path in found:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if self.sent.get(path.name) != digest:
                self.sent[path.name] = digest
                new.append(path)
        return new


class RunFolder:
    """What the trackers share: the run folder, whose report files they send (`files`), as
    their `log_dir` (Lightning's trackers have none)."""

    files: RunFiles

    @property
    def log_dir(self) -> str:
        return str(self.files.folder)


SQLITE = "sqlite:///"


class MLFlowLogger(RunFolder, LightningMLFlowLogger):
    """An MLflow run (`logger=mlflow`: a local SQLite store for every run); the run folder's
    report files become its artifacts (train logs the config as its hyperparameters).

    Lightning's logger opens the store when it is built (for SQLite: creates and migrates the
    database, seconds); this one opens it when the run starts, so building it writes nothing.
    """

    def __init__(self, run_dir: str | Path, tracking_uri: str, **kwargs: Any) -> None:
        needs("mlflow", "mlflow")
        # Absolute from the folder the run starts in: MLflow keeps one store per URI for the
        # process, so a relative `sqlite:///outputs/...` would write a later run started from
        # another folder (a test, a notebook's second run) into the first folder's store.
        if tracking_uri.startswith(SQLITE) and not tracking_uri.startswith(SQLITE + "/"):
            tracking_uri = SQLITE + str(Path(tracking_uri[len(SQLITE) :]).resolve())
        if kwargs.get("artifact_location") and "://" not in kwargs["artifact_location"]:
            kwargs["artifact_location"] = str(Path(kwargs["artifact_location"]).resolve())
        super().__init__(tracking_uri="http://localhost", **kwargs)  # a client that opens nothing
        self._tracking_uri, self._mlflow_client = tracking_uri, None
        self.files = RunFiles(run_dir)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._mlflow_client is None:
            from mlflow.tracking import MlflowClient

            self._mlflow_client = MlflowClient(self._tracking_uri)
        return super().experiment

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized:
            for path in self.files.changed():
                self.experiment.log_artifact(self.run_id, str(path))
        super().finalize(status)


class WandbLogger(RunFolder, LightningWandbLogger):
    """A W&B run (`logger=wandb`: offline, in `<run>/wandb/`); the run folder's report files are
    saved into the run's files (train logs the config as its hyperparameters).

    Lightning reuses a W&B run that is still open; the one a previous WandbLogger of this process
    started (a cv fold's, a multirun job's) is finished instead, so each run gets its own.
    """

    started: ClassVar[Any] = None  # the run the last WandbLogger started

    def __init__(self, run_dir: str | Path, **kwargs: Any) -> None:
        needs("wandb", "wandb")
        super().__init__(**kwargs)
        self.files = RunFiles(run_dir)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            import wandb

            if wandb.run is not None and wandb.run is WandbLogger.started:
                wandb.finish()
            if wandb.run is None:  # else one the user started (a W&B sweep's): Lightning's reuse
                WandbLogger.started = super().experiment
        return super().experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            for path in self.files.changed():
                folder = str(self.files.folder)
                self._experiment.save(str(path), base_path=folder, policy="now", glob=False)
        super().finalize(status)
