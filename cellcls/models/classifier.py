"""LightningModule: cross-entropy training of any image classifier network.

Over 300 lines: the one LightningModule, so every recipe option and what a trained model
carries (statistics, calibration, the OOD flag's buffers) load, train and predict in one place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cellcls.core.errors import CellclsError, is_number, is_whole, require
from cellcls.models.ensemble import mean_probabilities
from cellcls.models.ood import catch_features, embed, scores
from cellcls.models.recipe import balanced_weights, head_of

log = logging.getLogger(__name__)

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
    or, when `net` carries pretrained weights' statistics (`net.normalization`, see
    `cellcls.models.backbone`), with those: a pretrained stem expects the images it learnt from.
    The statistics used travel in the checkpoint, as buffers and in the hyperparameters
    (`mean`, `std`, and `normalization`: `data`, `imagenet` or the weights' name).
    `channels_last` runs the convolutions in NHWC memory format, faster on most CPUs and GPUs.

    The rest is the training recipe, all off by default (the tutorial's): `scheduler` (a partial
    taking the optimizer and `total_steps`, stepped after every batch), `label_smoothing` of the
    training loss (validation and test losses stay plain cross-entropy, comparable between
    recipes), `augment` (a module applied in `training_step` only, on the training device:
    see `cellcls.models.augment`) and `mix` (after it, blends the images of a training batch
    and their labels: MixUp or CutMix; `train/acc` is then measured against each image's own
    label). `tta` (set by `cellcls.eval` and `predict`, not saved)
    averages test and predict probabilities over the 8 flips and 90-degree rotations.

    Fine-tuning a pretrained network (`experiment=finetune`): the backbone (all but the head,
    `head_of(net)`) learns at `backbone_lr_scale` times the head's rate, and is frozen for the
    first `freeze_backbone_epochs` epochs (its gradients are dropped before each optimiser step;
    its BatchNorm statistics still adapt).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        classes: Sequence[str],
        mean: Sequence[float] | str = (0.5, 0.5, 0.5),
        std: Sequence[float] | str = (0.25, 0.25, 0.25),
        channels_last: bool = False,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        class_weights: str | Sequence[float] | None = None,
        augment: nn.Module | None = None,
        mix: Mix | None = None,
        backbone_lr_scale: float = 1.0,
        freeze_backbone_epochs: int = 0,
    ) -> None:
        super().__init__()
        ok = is_number(label_smoothing) and 0 <= label_smoothing < 1
        require(ok, "model.label_smoothing", label_smoothing, "a number in [0, 1)")
        ok = class_weights in (None, "balanced") or (
            not isinstance(class_weights, str)
            and len(class_weights) == len(classes)
            and all(is_number(w) and w > 0 for w in class_weights)
        )
        wanted = f"null, balanced or {len(classes)} numbers > 0"
        require(ok, "model.class_weights", class_weights, wanted)
        ok = is_number(backbone_lr_scale) and backbone_lr_scale > 0
        require(ok, "model.backbone_lr_scale", backbone_lr_scale, "a number > 0")
        require(
            is_whole(freeze_backbone_epochs, 0),
            "model.freeze_backbone_epochs",
            freeze_backbone_epochs,
            "an integer >= 0",
        )
        # Network, optimizer, schedule, augmentation and mixing are rebuilt from the Hydra config;
        # keep only plain values.
        ignore = ["net", "optimizer", "scheduler", "augment", "mix"]
        self.save_hyperparameters(ignore=ignore, logger=False)
        pretrained = getattr(net, "normalization", None)
        if pretrained is not None:
            mean, std = pretrained["mean"], pretrained["std"]
        # `auto` (data.mean=auto): the datamodule measures them when fitting starts (`setup`).
        self.measure = mean == "auto" or std == "auto"
        if self.measure:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.hparams.update(
            mean=list(mean),
            std=list(std),
            normalization=pretrained["name"] if pretrained is not None else "data",
        )
        self.backbone_lr_scale = backbone_lr_scale
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        # The training loss's class weights: set in `setup` (balanced: from the training images'
        # class counts); not saved, so checkpoints load as before.
        given = class_weights not in (None, "balanced")
        weights = [float(w) for w in class_weights] if given else [1.0] * len(classes)
        self.register_buffer("loss_weight", torch.tensor(weights, dtype=torch.float), False)
        self.augment = augment
        self.mix = mix
        self.tta = False
        self.trust = None  # the temperature, conformal, abstention and OOD evidence
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

    @property
    def temperature(self) -> float:
        """T of softmax(logits / T): 1 until fitted on held-out cells."""
        return float(self.trust["temperature"]) if self.trust else 1.0

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities of logits (or log-probabilities), calibrated by `temperature`."""
        return (logits.detach().float() / self.temperature).softmax(1)

    @property
    def ood(self) -> dict[str, Any] | None:
        """The out-of-distribution evidence fitted on held-out cells (`cellcls.reports.ood`)."""
        return self.trust.get("ood") if self.trust else None

    def outputs(self, x: Tensor) -> dict[str, Tensor]:
        """`probs` (calibrated, with `tta` as `scores`) and, once `ood` is fitted, each
        out-of-distribution score of `cellcls.models.ood` (of the image as given)."""
        if self.ood is None:
            return {"probs": self.probabilities(self.scores(x))}
        features, logits = embed(self, x)
        probs = self.probabilities(self.scores(x) if self.tta else logits)
        return {"probs": probs} | scores(features, logits, self.temperature, self._gaussian())

    @property
    def trust(self) -> dict[str, Any] | None:
        """What held-out cells taught of its probabilities (`cellcls.reports.trust`,
        `cellcls.reports.ood`); kept in checkpoints, set after fitting."""
        return self._trust

    @trust.setter
    def trust(self, value: dict[str, Any] | None) -> None:
        # The OOD flag's Gaussian as buffers (not saved: the checkpoint keeps `trust`), so they
        # follow the module to its device and into an exported graph as constants.
        self._trust = value
        fitted = (value or {}).get("ood", {}).get("gaussian")
        where = self.mean.device if hasattr(self, "mean") else None
        for name in ("means", "precision"):
            tensor = None if fitted is None else torch.tensor(fitted[name], device=where)
            self.register_buffer(f"ood_{name}", tensor, persistent=False)

    def _gaussian(self) -> dict[str, Tensor]:
        return {"means": self.ood_means, "precision": self.ood_precision}

    def _step(
        self, batch: tuple[Tensor, Tensor], stage: str, target: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Loss against `target` (soft labels of a mixed batch) or the labels; accuracy
        against the labels."""
        x, y = batch
        logits = self.scores(x) if stage == "test" else self(x)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        weight = self.loss_weight if stage == "train" else None
        loss = F.cross_entropy(
            logits, y if target is None else target, weight, label_smoothing=smoothing
        )
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
        if self.ood is None or self.tta:
            logits = self._step(batch, "test")[1]
            return {"probs": self.probabilities(logits), "labels": batch[1]}
        with catch_features(self.net) as caught:  # the flag's score, from the same pass
            logits = self._step(batch, "test")[1]
        ood = scores(caught[-1].flatten(1), logits, self.temperature, self._gaussian())
        return {
            "probs": self.probabilities(logits),
            "labels": batch[1],
            "ood": ood[self.ood["score"]],
        }

    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        """Class probabilities of a batch of images (or of `(images, labels)`), for
        `Trainer.predict` (see cellcls.predict)."""
        x = batch if isinstance(batch, Tensor) else batch[0]
        return self.probabilities(self.scores(x))

    def setup(self, stage: str) -> None:
        """With `mean`/`std` `auto`: take the datamodule's, measured on the training images
        (`statistics`); a resumed fit then loads the checkpoint's over them."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        stats = getattr(dm, "statistics", None)
        if stage == "fit" and self.class_weights == "balanced":
            self.loss_weight.copy_(balanced_weights(getattr(dm, "class_counts", None)))
        if stage != "fit" or not self.measure:
            return
        if stats is None:
            log.warning("model.mean=auto, but the datamodule measured no statistics: unnormalised")
            return
        self.mean.copy_(torch.tensor(stats["mean"]).view(1, -1, 1, 1))
        self.std.copy_(torch.tensor(stats["std"]).view(1, -1, 1, 1))
        self.hparams.update(mean=list(stats["mean"]), std=list(stats["std"]))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run rebuilds its network without the pretrained file (the checkpoint holds
        # the weights and the statistics buffers): keep the record of where they came from.
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("mean", "std", "normalization"):
            if key in saved:
                self.hparams[key] = saved[key]
        self.trust = checkpoint.get("trust")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trust:
            checkpoint["trust"] = self.trust

    def on_fit_start(self) -> None:
        self.trust = None  # the weights change: a calibration of the old ones no longer holds
        finetune = self.backbone_lr_scale != 1 or self.freeze_backbone_epochs
        if finetune and self.hparams.normalization == "data":
            log.warning(
                "model.backbone_lr_scale=%s and model.freeze_backbone_epochs=%s fine-tune a "
                "pretrained network, but this one starts from scratch (model.net.weights=null); "
                "give model.net.weights=imagenet or PATH.",
                self.backbone_lr_scale,
                self.freeze_backbone_epochs,
            )

    def on_after_backward(self) -> None:
        # Frozen: the backbone's gradients are dropped before the step, so the optimiser skips
        # it (no update, no weight decay, no state). Not requires_grad=False: DDP cannot follow
        # a change of it after the model is wrapped.
        if self.current_epoch < self.freeze_backbone_epochs:
            for p in self.parameter_groups()[0]["params"]:
                p.grad = None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The backbone's parameters (with `lr_scale`) and the head's: `head_of(net)`."""
        head = {id(p) for p in head_of(self.net).parameters()}
        params = list(self.net.parameters())
        return [
            {
                "name": "backbone",
                "params": [p for p in params if id(p) not in head],
                "lr_scale": self.backbone_lr_scale,
            },
            {"name": "head", "params": [p for p in params if id(p) in head], "lr_scale": 1.0},
        ]

    def configure_optimizers(self) -> Any:
        if self.backbone_lr_scale == 1:
            optimizer = self.optimizer(params=self.parameters())
        else:
            optimizer = self.optimizer(params=self.parameter_groups())
            for group in optimizer.param_groups:
                group["lr"] *= group["lr_scale"]
        if self.scheduler is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise CellclsError(
                "model.scheduler needs to know the run's length: set trainer.max_epochs or "
                "trainer.max_steps (or model.scheduler=null)."
            )
        kwargs: dict[str, Any] = {}
        peak = getattr(self.scheduler, "keywords", {}).get("max_lr")
        if peak is not None and self.backbone_lr_scale != 1:
            # A schedule to a peak (one-cycle's max_lr) sets every group's rate: scale it too.
            kwargs["max_lr"] = [peak * group["lr_scale"] for group in optimizer.param_groups]
        scheduler = self.scheduler(optimizer, total_steps=int(total), **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
