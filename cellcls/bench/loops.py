"""The loops `cellcls.bench` times: one pass timer and the three ways to train it compares."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from cellcls.core.hardware import synchronize
from cellcls.data.datamodule import ImageFolderDataModule
from cellcls.data.datasets import CachedImages
from cellcls.data.device import DeviceBatches
from cellcls.run.callbacks import EpochSpeed

# Passes per measurement: the first warms caches and workers; the best of the others counts,
# which damps the noise of a shared machine the same way for every pipeline.
PASSES = 3


def timed_pass(batches: Callable[[], Iterable[Any]], step: Callable[[Any], None], device) -> float:
    """Images per second of the fastest pass after the first."""
    speeds = []
    for _ in range(PASSES):
        n, start = 0, time.perf_counter()
        for batch in batches():
            step(batch)
            n += len(batch[1])
        synchronize(device)
        speeds.append(n / (time.perf_counter() - start))
    return max(speeds[1:])


def tutorial_loader(
    dm: ImageFolderDataModule, full: CachedImages, indices: list[int], workers: int
) -> DataLoader:
    """ImageFolder + PIL decode and resize of every image in every epoch, as tutorials do."""
    folder = ImageFolder(
        str(dm.split_root / dm.hparams.train_split),
        transform=transforms.Compose(
            [transforms.Resize((dm.hparams.image_size,) * 2), transforms.ToTensor()]
        ),
    )
    by_path = {path: i for i, (path, _) in enumerate(folder.samples)}
    subset = Subset(folder, [by_path[full.samples[i][0]] for i in indices])
    return DataLoader(
        subset,
        batch_size=dm.hparams.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


# Where a row's training batches come from: DEVICE, the split copied once onto the training
# device and every batch indexed there (the datamodule's `DeviceBatches`); HOST, every batch built
# on the host and, on a GPU, copied to it per batch.
DEVICE, HOST = "device", "host"


def data_path(dm: ImageFolderDataModule, device: torch.device) -> str:
    """DEVICE or HOST: where the datamodule puts `dm.train_set`'s batches when a single-process
    Lightning run trains on `device`: its own rule (`keeps_on`), so the plain loop takes the
    path the Lightning rows take."""
    return DEVICE if dm.keeps_on(dm.train_set, device, world_size=1) else HOST


def plain_torch_train(
    cfg: DictConfig,
    full: CachedImages,
    indices: list[int],
    batch_size: int,
    device: torch.device,
    statistics: dict[str, Any],
    path: str = HOST,
) -> float:
    """A minimal hand-written fp32 training loop over the cached tensors. With `path` DEVICE the
    images and labels are copied onto `device` once and every batch is indexed there, as the
    datamodule's device store does; with HOST every batch is indexed on the host and copied.
    `statistics` is the datamodule's normalisation (`ImageFolderDataModule.statistics`)."""
    images, labels = full.images[full.rows[indices]].contiguous(), full.targets[indices]
    if path == DEVICE:
        images, labels = images.to(device), labels.to(device)
    net = instantiate(cfg.model.net).to(device)
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    # What CellClassifier normalises with: a pretrained net's own statistics, else the
    # datamodule's (measured for `data.mean=auto`), never the config's raw value.
    stats = getattr(net, "normalization", None) or statistics
    mean = torch.tensor(stats["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats["std"], device=device).view(1, -1, 1, 1)
    bs = batch_size

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(indices), device=images.device)
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            yield images[idx], labels[idx]

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        # No copy when the batch is already on `device` (DEVICE): `.to` returns it as it is.
        x = (batch[0].to(device).float() / 255 - mean) / std
        loss = F.cross_entropy(net(x), batch[1].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timed_pass(batches, step, device)


def lightning_train(
    cfg: DictConfig, dm: ImageFolderDataModule, **settings: Any
) -> tuple[float, str]:
    """cellcls's own training (no validation), timed as `timed_pass` times the others, and the
    data path (DEVICE or HOST) its batches took; with `settings` (the plain loop's), also without
    augmentation or mixing, as it trains."""
    model_kwargs = (
        {"channels_last": settings.pop("channels_last"), "augment": None, "mix": None}
        if settings
        else {}
    )
    model = instantiate(cfg.model, _convert_="object", **model_kwargs)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_epochs=PASSES,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[speed := EpochSpeed()],
        **settings,
    )
    trainer.fit(model, datamodule=dm)
    path = DEVICE if isinstance(trainer.train_dataloader, DeviceBatches) else HOST
    return max(speed.img_s[1:]), path
