"""Callbacks cellcls adds to Lightning's own."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cellcls.checkpoint import CONFIG_KEY
from cellcls.report import format_table, plot_curves, write_report

log = logging.getLogger(__name__)


class EpochSpeed(L.Callback):
    """Log `train/epoch_s` (wall time of the training part of an epoch) and `train/img_s`.

    Validation is excluded, so the figures describe training throughput alone.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._end = time.perf_counter()
        self._images = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._images += len(batch[1])
        self._end = time.perf_counter()  # validation runs before on_train_epoch_end

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._end - self._start
        pl_module.log("train/epoch_s", seconds)
        pl_module.log("train/img_s", self._images / seconds)


class TrainingCurves(L.Callback):
    """Write `curves.png` (loss and accuracy per epoch, train and val) after every epoch.

    The history is part of the checkpoint, so a resumed run continues its curves.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        logged = trainer.callback_metrics
        keys = ("train/loss", "train/acc", "val/loss", "val/acc")
        metrics = {k: float(logged[k]) for k in keys if k in logged}
        self.history.append({"epoch": trainer.current_epoch + 1, **metrics})
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            plot_curves(self.history, self.out_dir / "curves.png")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


class TestReport(L.Callback):
    """After testing, write the report (see `cellcls.report.write_report`) and print its table.

    The datamodule must expose `test_paths` in the test loader's order; the module's
    `test_step` returns the batch's class probabilities and labels.
    """

    def __init__(self, out_dir: str | Path, checkpoint: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.checkpoint = checkpoint

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._probs.append(outputs["probs"].float().cpu())
        self._labels.append(outputs["labels"].cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        metrics = write_report(
            self.out_dir,
            dm.test_paths,
            torch.cat(self._labels).numpy(),
            torch.cat(self._probs).numpy(),
            pl_module.classes,
            split=dm.hparams.split,
            root=str(dm.root),
            checkpoint=str(self.checkpoint or trainer.ckpt_path or ""),
        )
        log.info("Test report in %s\n%s", self.out_dir, format_table(metrics))


class SaveConfig(L.Callback):
    """Store the run's resolved data and model config in every checkpoint.

    `cellcls.eval`, `predict` and `export` rebuild the model and data from it, so a checkpoint
    is enough on its own, wherever it travels.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config
