"""data.on_device: a split's decoded images copied once onto the training device, batches
indexed there (the GPU path; exercised here on the CPU, which takes the same code)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cellcls.core.errors import CellclsError
from cellcls.data.device import DeviceBatches
from cellcls.train import train
from tests.conftest import FAST, compose_run, make_dm


def fitted_dm(root: Path, **kw):
    """A datamodule set up for fit and attached to a one-process CPU trainer."""
    dm = make_dm(root, **kw)
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    dm.setup("fit")
    return dm


def test_batches_are_the_split_indexed_on_the_device(tiny_root: Path) -> None:
    dm = fitted_dm(tiny_root, on_device=True, batch_size=5)
    train_set = dm.train_set
    batches = dm.train_dataloader()
    assert isinstance(batches, DeviceBatches) and len(batches) == -(-len(train_set) // 5)
    # In order, every batch is what the store's own batch fetch returns.
    ordered = DeviceBatches(train_set, 5, torch.device("cpu"))
    for start, (x, y) in zip(range(0, len(train_set), 5), ordered, strict=True):
        idx = list(range(start, min(start + 5, len(train_set))))
        want_x, want_y = train_set.dataset.__getitems__([train_set.indices[i] for i in idx])
        assert x.dtype == torch.uint8 and torch.equal(x, want_x) and torch.equal(y, want_y)
    # Shuffled: every image once per epoch, in a new order each epoch.
    epochs = [torch.cat([x.flatten(1).sum(1) for x, _ in batches]) for _ in range(2)]
    want = torch.cat([x.flatten(1).sum(1) for x, _ in ordered])
    assert all(torch.equal(e.sort().values, want.sort().values) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])


def test_auto_keeps_the_dataloader_off_a_gpu_and_bad_settings_are_named(tiny_root: Path) -> None:
    assert isinstance(fitted_dm(tiny_root).train_dataloader(), DataLoader)
    assert isinstance(fitted_dm(tiny_root, on_device=False).val_dataloader(), DataLoader)
    with pytest.raises(CellclsError, match=r"data.on_device='maybe' is not accepted"):
        make_dm(tiny_root, on_device="maybe")
    with pytest.raises(CellclsError, match=r"data.on_device=True .*data.cache=null"):
        make_dm(tiny_root, on_device=True, cache=None)


@pytest.mark.slow
def test_training_with_images_on_the_device(in_tmp: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cellcls.data.datamodule")
    overrides = [
        *FAST,
        "data.n_train=8",
        "data.n_test=3",
        "data.on_device=true",
        "trainer.max_epochs=1",
    ]
    metrics = train(compose_run(overrides, in_tmp / "run"))
    assert 0 <= metrics["test/acc"] <= 1 and metrics["val/acc_best"] > 0
    moved = [r.getMessage() for r in caplog.records if "no DataLoader" in r.getMessage()]
    assert len(moved) == 3 and all(" on cpu:" in m or " on cpu" in m for m in moved), moved
