"""Datasets over the store (`CachedImages`: whole batches in one indexing operation) and over
image files without labels (`ImageFiles`, for predict)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)


class CachedImages(Dataset):
    """Decoded images and their labels; whole batches are fetched with one indexing operation."""

    def __init__(
        self,
        images: Tensor,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        rows: Sequence[int] | None = None,
    ) -> None:
        self.images = images
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = torch.tensor([label for _, label in self.samples])
        # The store row of each sample: skipped files keep their row but have no sample.
        self.rows = torch.arange(len(self.samples)) if rows is None else torch.as_tensor(rows)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[self.rows[i]], self.targets[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # DataLoader hands a batch's indices here; collate_fn must then pass the batch through.
        idx = torch.as_tensor(indices)
        # A row copy from the store's own NHWC memory (index_select), viewed as NCHW: about 6x
        # faster than fancy indexing the NCHW view, and already channels-last for the model.
        rows = self.images.permute(0, 2, 3, 1).index_select(0, self.rows[idx])
        return rows.permute(0, 3, 1, 2), self.targets[idx]


def split_rows(dataset: Dataset) -> tuple[CachedImages, Tensor, Tensor]:
    """The store, store rows and labels of a `CachedImages` or a `Subset` of one."""
    if isinstance(dataset, Subset):
        full, picked = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    else:
        full, picked = dataset, torch.arange(len(dataset))
    if not isinstance(full, CachedImages):
        raise TypeError(f"not a decoded-image store: {type(full).__name__}")
    return full, full.rows[picked], full.targets[picked]


def store_bytes(dataset: Dataset) -> int:
    """Bytes one split's images take once copied out of the store."""
    full, rows, _ = split_rows(dataset)
    return len(rows) * full.images[0].numel() * full.images.element_size()


def batch_as_is(batch: Any) -> Any:
    """Collate for `CachedImages`, whose `__getitems__` already returns a whole batch."""
    return batch
