"""LightningModule: cross-entropy training of any image classifier network."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class CellClassifier(L.LightningModule):
    """Trains `net` (images -> logits) with cross-entropy; logs `{train,val,test}/{loss,acc}`.

    Cross-entropy on logits is the tutorial's softmax + sparse categorical cross-entropy.
    `optimizer` is a partial (Hydra `_partial_: true`) that only lacks the parameters.
    Inputs are uint8 images (0-255) or float images in [0, 1]; they are normalised here with
    the training set's per-channel `mean` and `std` (of [0, 1] images), on the training device,
    and those statistics travel in the checkpoint.
    `channels_last` runs the convolutions in NHWC memory format, faster on most CPUs and GPUs.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        classes: Sequence[str],
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # The network and optimizer are rebuilt from the Hydra config; keep only plain values.
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last
        self.optimizer = optimizer
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

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
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
        return self._step(batch, "train")[0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        # Per-image outputs for callbacks that write reports (see cellcls.callbacks.TestReport).
        logits = self._step(batch, "test")[1]
        return {"probs": logits.detach().float().softmax(1), "labels": batch[1]}

    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        """Class probabilities of a batch of images (or of `(images, labels)`), for
        `Trainer.predict` (see cellcls.predict)."""
        x = batch if isinstance(batch, Tensor) else batch[0]
        return self(x).float().softmax(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(params=self.parameters())
