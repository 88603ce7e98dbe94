"""Per-channel statistics of the training images (`data.mean=auto`), for the model's
normalisation: measured on the images as they are trained on (cropped and resized), so they are
right for any dataset and any crop, not numbers written by hand for one of them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def channel_stats(images: Tensor, rows: Sequence[int], chunk: int = 512) -> tuple[list, list]:
    """Mean and standard deviation per channel, in [0, 1], of `images[rows]` (uint8 N x C x H
    x W), summed in float64 a chunk at a time (a disk store is memory-mapped: never copied)."""
    rows = list(rows)
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(rows), chunk):
        x = images[rows[start : start + chunk]].double()
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = len(rows) * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return (mean / 255).tolist(), (std / 255).tolist()
