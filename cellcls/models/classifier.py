"""LightningModule: cross-entropy training of any image classifier network."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cellcls.core.errors import CellclsError, is_number, require
from cellcls.models.ensemble import mean_probabilities

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# Called as `scheduler(optimizer, total_steps=N)`, e.g. a partial of OneCycleLR.
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
# Called as `mix(images, labels)` on a training batch of float images in [0, 1], returning the
# mixed images and their soft labels (batch, classes): torchvision.transforms.v2.MixUp or CutMix.
Mix = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class CellClassifier(L.LightningModule):
    """Trains `net` (images -> logits) with cross-entropy; logs `{train,val,test}/{loss,acc}`.

    Cross-entropy on logits is the tutorial's softmax + sparse categorical cross-entropy.
    `optimizer` is a partial (Hydra `_partial_: true`) that only lacks the parameters.
    Inputs are uint8 images (0-255) or float images in [0, 1]; they are normalised here with
    the training set's per-channel `mean` and `std` (of [0, 1] images), on the training device,
    and those statistics travel in the checkpoint.
    `channels_last` runs the convolutions in NHWC memory format, faster on most CPUs and GPUs.

    The rest is the training recipe, all off by default (the tutorial's): `scheduler` (a partial
    taking the optimizer and `total_steps`, stepped after every batch), `label_smoothing` of the
    training loss (validation and test losses stay plain cross-entropy, comparable between
    recipes), `augment` (a module applied in `training_step` only, on the training device:
    see `cellcls.models.augment`) and `mix` (after it, blends the images of a training batch
    and their labels: MixUp or CutMix; `train/acc` is then measured against each image's own
    label). `tta` (set by `cellcls.eval` and `predict`, not saved)
    averages test and predict probabilities over the 8 flips and 90-degree rotations.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        classes: Sequence[str],
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        channels_last: bool = False,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        augment: nn.Module | None = None,
        mix: Mix | None = None,
    ) -> None:
        super().__init__()
        ok = is_number(label_smoothing) and 0 <= label_smoothing < 1
        require(ok, "model.label_smoothing", label_smoothing, "a number in [0, 1)")
        # Network, optimizer, schedule, augmentation and mixing are rebuilt from the Hydra config;
        # keep only plain values.
        ignore = ["net", "optimizer", "scheduler", "augment", "mix"]
        self.save_hyperparameters(ignore=ignore, logger=False)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.mix = mix
        self.tta = False
        self.classes = list(classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        n = len(self.classes)
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(n, average="micro") for _ in range(3)
        )
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric() for _ in range(3))
        self.val_acc_best = MaxMetric()

    def forward(self, x: Tensor) -> Tensor:
        # uint8 images (the datamodule's batches) are scaled to [0, 1] and normalised in one
        # pass on the device; float images are taken to be in [0, 1] already.
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        x = (x.float() - self.mean * scale) / (self.std * scale)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.net(x.contiguous(memory_format=layout))

    def scores(self, x: Tensor) -> Tensor:
        """Logits of `x`; with `tta`, the log of the class probabilities averaged over the 8
        flips and 90-degree rotations of each image (a cell has no up, no left)."""
        if not self.tta:
            return self(x)
        views = [v for k in range(4) for v in (x.rot90(k, (-2, -1)), x.rot90(k, (-2, -1)).flip(-1))]
        return mean_probabilities([self(v) for v in views])

    def _step(
        self, batch: tuple[Tensor, Tensor], stage: str, target: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Loss against `target` (soft labels of a mixed batch) or the labels; accuracy
        against the labels."""
        x, y = batch
        logits = self.scores(x) if stage == "test" else self(x)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y if target is None else target, label_smoothing=smoothing)
        loss_metric, acc_metric = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        loss_metric(loss, weight=len(y))
        acc_metric(logits, y)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", acc_metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss, logits

    def on_train_start(self) -> None:
        # The sanity check's batches must not count towards the best validation accuracy.
        self.val_acc_best.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.augment is not None:  # training batches only, on the device they train on
            x = self.augment(x)
        target = None
        if self.mix is not None:  # blended in [0, 1]: uint8 would round the mixture
            x = x.float() / 255 if x.dtype == torch.uint8 else x
            x, target = self.mix(x, y)
        return self._step((x, y), "train", target)[0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        # Per-image outputs for callbacks that write reports (see cellcls.run.callbacks.TestReport).
        logits = self._step(batch, "test")[1]
        return {"probs": logits.detach().float().softmax(1), "labels": batch[1]}

    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        """Class probabilities of a batch of images (or of `(images, labels)`), for
        `Trainer.predict` (see cellcls.predict)."""
        x = batch if isinstance(batch, Tensor) else batch[0]
        return self.scores(x).float().softmax(1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(params=self.parameters())
        if self.scheduler is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise CellclsError(
                "model.scheduler needs to know the run's length: set trainer.max_epochs or "
                "trainer.max_steps (or model.scheduler=null)."
            )
        scheduler = self.scheduler(optimizer, total_steps=int(total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
