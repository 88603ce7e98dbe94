"""After fitting: what the chosen checkpoint's probabilities are worth, learnt on the cells that
validation held out, written into that checkpoint (so eval, predict, export and the Python API
all apply it), before the test set is ever scored."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cellcls.reports.trust import heldout_evidence, scale

log = logging.getLogger(__name__)


def calibrate_on_heldout(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, best: str
) -> None:
    """Fit the temperature and the conformal and abstention evidence (`cellcls.reports.trust`) on
    grouped validation with the weights of checkpoint `best`; store them in it as `trust`.

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
        log.info("Probabilities not calibrated, no conformal sets or abstention: %s.", why)
        return
    # Fit's own validation batches where it kept them (images already on the device stay there).
    loader = trainer.val_dataloaders or datamodule.val_dataloader()
    batches = trainer.predict(model, dataloaders=loader, ckpt_path=best, weights_only=True)
    # As the network gives them: undo a temperature the loaded checkpoint may already carry.
    probs = scale(torch.cat(batches).float().numpy(), 1 / model.temperature)
    val = datamodule.val_set
    labels = np.array([val.dataset.samples[i][1] for i in val.indices])
    evidence = heldout_evidence(probs, labels, groups, model.classes)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt["trust"] = evidence
    torch.save(ckpt, Path(best))
    model.trust = evidence
    log.info(
        "Calibrated on %d held-out images of %d cells: temperature %.3f; conformal sets and "
        "abstention from the same cells (stored in %s)",
        *(evidence["n_images"], evidence["n_cells"], evidence["temperature"], best),
    )
