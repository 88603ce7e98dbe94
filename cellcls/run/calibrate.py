"""After fitting: what the chosen checkpoint's probabilities are worth, learnt on the cells that
validation held out, written into that checkpoint (so eval, predict, export and the Python API
all apply it), before the test set is ever scored."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from cellcls.models.ood import embed, scores
from cellcls.reports.ood import fit_gaussian, ood_evidence
from cellcls.reports.trust import heldout_evidence

log = logging.getLogger(__name__)


def calibrate_on_heldout(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, best: str
) -> None:
    """Fit the temperature, the conformal and abstention evidence (`cellcls.reports.trust`) and
    the out-of-distribution evidence (`cellcls.reports.ood`: its Gaussian from the training
    images, its threshold's scores from the held-out cells) with the weights of checkpoint
    `best`; store them in it as `trust`.

    Skipped, with a line saying so, where there are no held-out cells to fit on: a random or no
    validation split, no best checkpoint, several processes (DDP)."""
    groups = getattr(datamodule, "val_groups", None)
    why = (
        "no best checkpoint was saved"
        if not best
        else "validation did not hold out whole cells (data.val_split=grouped)"
        if not groups
        else "it runs on one process (this run has several)"
        if trainer.world_size > 1
        else None
    )
    if why:
        log.info("Not calibrated (no conformal sets, abstention or OOD flag): %s.", why)
        return
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    # Fit's own batches where it kept them (images already on the device stay there); the
    # training batches are not augmented until training_step, which this does not call.
    device = trainer.strategy.root_device
    val = trainer.val_dataloaders or datamodule.val_dataloader()
    train = trainer.train_dataloader or datamodule.train_dataloader()
    model.to(device).eval()
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        features, logits, labels = embed_batches(model, val, device)
        train_features, _, train_labels = embed_batches(model, train, device)
    model.cpu()
    probs = logits.softmax(1).numpy()  # as the network gives them, before any temperature
    evidence = heldout_evidence(probs, labels.numpy(), groups, model.classes)
    gaussian = fit_gaussian(train_features.numpy(), train_labels.numpy(), len(model.classes))
    held = scores(features, logits, evidence["temperature"], gaussian)
    evidence["ood"] = ood_evidence({k: v.numpy() for k, v in held.items()}, groups, gaussian)
    ckpt["trust"] = evidence
    torch.save(ckpt, Path(best))
    model.trust = evidence
    log.info(
        "Calibrated on %d held-out images of %d cells: temperature %.3f; conformal sets, "
        "abstention and the OOD flag (%s) from the same cells (stored in %s)",
        *(evidence["n_images"], evidence["n_cells"], evidence["temperature"]),
        *(evidence["ood"]["score"], best),
    )


def embed_batches(
    model: L.LightningModule, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Penultimate features, logits and labels of every `(images, labels)` batch, on the CPU."""
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    for x, y in batches:
        f, z = embed(model, x.to(device, non_blocking=True))
        out.append((f.cpu(), z.cpu(), y.cpu()))
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]
