"""A split's images kept on the training device: batches without a DataLoader."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cellcls.core.hardware import free_device_memory
from cellcls.data.datasets import split_rows, store_bytes

log = logging.getLogger(__name__)
# With on_device="auto", a split's images go onto a GPU when they take less than this share of
# its free memory.
DEVICE_SHARE = 0.5


def fits_on(dataset: Dataset, device: torch.device, name: str = "images") -> bool:
    """Whether a split's stored images take under `DEVICE_SHARE` of the memory free on CUDA
    `device` (the allocator's cache counted as free); logged when they do not."""
    need, free = store_bytes(dataset), free_device_memory(device)
    if need >= DEVICE_SHARE * free:
        log.info(
            "%s: %.2f GB of images would take over half of the %.2f GB free on %s: they stay "
            "on the host, batches come through a DataLoader",
            *(name, need / 1e9, free / 1e9, device),
        )
        return False
    return True


class DeviceBatches:
    """Batches of one split whose images and labels were copied once onto the training device.

    Each batch is one `index_select` there: no DataLoader, no worker process, no host-to-device
    copy per batch, so a GPU is not kept waiting by a 2-core host (Colab's T4). Shuffled with
    the device's global RNG, which Lightning's `seed_everything` seeds. Batches are uint8 NCHW
    views of channels-last memory, like `CachedImages.__getitems__`.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, device: torch.device, shuffle: bool = False
    ) -> None:
        full, rows, targets = split_rows(dataset)
        # NHWC rows, as the store holds them; the one copy to the device.
        self.images = full.images.permute(0, 2, 3, 1).index_select(0, rows).to(device)
        self.targets = targets.to(device)
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, device = len(self.targets), self.targets.device
        order = torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)
        for idx in order.split(self.batch_size):
            yield self.images.index_select(0, idx).permute(0, 3, 1, 2), self.targets[idx]
