"""Loggers cellcls adds to Lightning's own."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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
