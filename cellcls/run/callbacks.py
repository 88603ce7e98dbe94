"""Callbacks that measure and report: speed, curves, crop previews, the test report.

Those that keep state in checkpoints are in `cellcls.run.state`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cellcls.core.errors import is_level, is_whole, require
from cellcls.core.hardware import synchronize
from cellcls.reports.gradcam import write_gradcam
from cellcls.reports.metrics import format_table, write_report
from cellcls.reports.plots import plot_crops, plot_curves

log = logging.getLogger(__name__)


class EpochSpeed(L.Callback):
    """Log `train/epoch_s` (wall time of the training part of an epoch) and `train/img_s`.

    Validation is excluded, so the figures describe training throughput alone. A run resumed
    mid-epoch starts without `on_train_epoch_start`: its first figures cover the rest of it
    (resumed in validation, that epoch has no training left to time and logs none).
    On a GPU the clock is read after the device has finished its queued work (at the start and
    after the epoch's last batch), or it would time the kernel launches, not the maths.
    """

    def __init__(self) -> None:
        self.img_s: list[float] = []  # this process's images per second, one per epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start = self._end = time.perf_counter()
        self._images = 0

    on_train_start = on_train_epoch_start

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._images += len(batch[1])
        if batch_idx + 1 >= trainer.num_training_batches:
            synchronize(pl_module.device)
        self._end = time.perf_counter()  # validation runs before on_train_epoch_end

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._images:  # resumed after the epoch's last batch
            return
        seconds = self._end - self._start
        self.img_s.append(self._images / seconds)
        pl_module.log("train/epoch_s", seconds, sync_dist=True)
        # Under DDP, images per second of all processes together.
        pl_module.log("train/img_s", self._images / seconds, sync_dist=True, reduce_fx="sum")


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


class CropPreview(L.Callback):
    """With `data.crop`, write `crops.png` (random training crops, a row per class) and
    `centred.txt` (the images in which no white cell was found) when fitting starts."""

    def __init__(self, out_dir: str | Path, per_class: int = 10, seed: int = 0) -> None:
        self.out_dir, self.per_class, self.seed = Path(out_dir), per_class, seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not getattr(dm.hparams, "crop", None):
            return
        data = dm.train_set
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))
        picked = order[: 40 * self.per_class].tolist()  # enough for a row of each class
        images, labels = zip(*(data[i] for i in picked), strict=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plot_crops(
            torch.stack(images),
            torch.stack(labels),
            dm.classes,
            self.out_dir / "crops.png",
            self.per_class,
        )
        centred = [p for paths in dm.centred.values() for p in paths]
        (self.out_dir / "centred.txt").write_text("".join(f"{p}\n" for p in centred))


class TestReport(L.Callback):
    """After testing, write the report (`cellcls.reports.metrics.write_report`); print its table.

    The datamodule must expose `test_paths` in the test loader's order; the module's
    `test_step` returns the batch's class probabilities and labels. Under DDP, Lightning's
    DistributedSampler gives rank r images r, r + W, r + 2W, ... of the W processes, the last ones
    repeated from the start to even the shares: they are gathered, put back in order and the
    repeats dropped, so the report covers each image once.

    The test loader is not shuffled, so a test limited to a few batches (`fast_dev_run`,
    `limit_test_batches`) scores the split's first images, on one process or interleaved over
    several: the report covers exactly those, and says how many of the split they are
    (`n_images` of `n_split` in metrics.json, and a warning).

    A datamodule with `report_groups(paths)` (the source group of each test image) gets 95%
    intervals over source cells in the report, and `per_group.csv`; its errors are not caught.

    A model calibrated on held-out cells (its `trust`, `cellcls.run.calibrate`) gets conformal
    coverage and set size at each level of `coverage` and abstention at each accuracy of
    `abstain` and the OOD flag's false flags at each rate of `ood` in metrics.json's `trust`
    (`cellcls.reports.trust_figures`).

    With `gradcam` (`report.gradcam=true`), also `gradcam.png` (`cellcls.reports.gradcam`): the
    most confident errors and `gradcam_per_class` correct images per class, read from the
    datamodule's `test_set` (in `test_paths`' order), each with its heat map. Only they go
    through the network again, with a backward pass, on rank 0.
    """

    def __init__(
        self,
        out_dir: str | Path,
        checkpoint: str | Sequence[str] | None = None,
        gradcam: bool = False,
        gradcam_per_class: int = 3,
        coverage: Sequence[float] = (0.9, 0.95),
        abstain: Sequence[float] = (0.95,),
        ood: Sequence[float] = (0.05,),
    ) -> None:
        require(isinstance(gradcam, bool), "report.gradcam", gradcam, "true or false")
        asked = {"report.coverage": coverage, "report.abstain": abstain, "report.ood": ood}
        for name, levels in asked.items():
            ok = isinstance(levels, Sequence) and not isinstance(levels, str)
            ok = ok and all(is_level(v) for v in levels)
            require(ok, name, levels, "a list of numbers between 0 and 1 (exclusive): [0.9, 0.95]")
        self.coverage, self.abstain = [float(v) for v in coverage], [float(v) for v in abstain]
        self.ood = [float(v) for v in ood]
        ok = is_whole(gradcam_per_class, 1)
        require(ok, "report.gradcam_per_class", gradcam_per_class, "an integer >= 1")
        self.out_dir = Path(out_dir)
        self.gradcam, self.gradcam_per_class = gradcam, gradcam_per_class
        # An ensemble's checkpoints, comma-separated.
        self.checkpoint = (
            checkpoint
            if checkpoint is None or isinstance(checkpoint, str)
            else ", ".join(map(str, checkpoint))
        )

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ood: list[torch.Tensor] = []

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
        if "ood" in outputs:
            self._ood.append(outputs["ood"].float().cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        probs, labels = torch.cat(self._probs), torch.cat(self._labels)
        ood = torch.cat(self._ood) if self._ood else None
        if trainer.world_size > 1:  # (W, n, ...) -> image order, as described above
            probs, labels = (
                pl_module.all_gather(t.to(pl_module.device)).transpose(0, 1).flatten(0, 1).cpu()
                for t in (probs, labels)
            )
            ood = None  # fitted on one process only (cellcls.run.calibrate)
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        paths = dm.test_paths
        n = min(len(labels), len(paths))  # more than the split: DDP's repeats; fewer: limited
        if n < len(paths):
            log.warning(
                "Testing was limited (fast_dev_run or limit_test_batches): the test report covers "
                "the first %d of the %d images of %s, and its figures are not the split's.",
                n,
                len(paths),
                dm.hparams.split,
            )
        report_groups = getattr(dm, "report_groups", None)
        metrics = write_report(
            self.out_dir,
            paths[:n],
            labels[:n].numpy(),
            probs[:n].numpy(),
            pl_module.classes,
            groups=report_groups(paths[:n]) if report_groups is not None else None,
            evidence=getattr(pl_module, "trust", None),
            coverage=self.coverage,
            abstain=self.abstain,
            ood=(self.ood, ood[:n].numpy()) if ood is not None else None,
            n_split=len(paths),
            split=dm.hparams.split,
            val_split=val_split(dm.hparams),  # what chose val/* and the checkpoint
            root=str(dm.root),
            checkpoint=str(self.checkpoint or trainer.ckpt_path or ""),
        )
        log.info("Test report in %s\n%s", self.out_dir, format_table(metrics))
        if self.gradcam:
            test_set = dm.test_set
            write_gradcam(
                self.out_dir / "gradcam.png",
                pl_module,
                lambda picked: torch.stack([test_set[i][0] for i in picked]),
                probs[:n].numpy(),
                pl_module.classes,
                labels[:n].numpy(),
                self.gradcam_per_class,
                paths[:n],
            )


def val_split(hparams: Any) -> str | None:
    """How validation was held out of TRAIN, for the report: `none` when all of TRAIN trained."""
    if getattr(hparams, "val_fraction", 1) == 0:
        return "none (all of TRAIN trained; the last epoch was tested)"
    return getattr(hparams, "val_split", None)
