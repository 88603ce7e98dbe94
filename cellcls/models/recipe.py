"""Parts of the training recipe that need no module: the head to fine-tune, class weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cellcls.core.errors import CellclsError


def head_of(net: nn.Module) -> nn.Module:
    """The classifier head: timm's `get_classifier()`, else the network's last linear layer."""
    if hasattr(net, "get_classifier"):
        return net.get_classifier()
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise CellclsError(
            f"model.backbone_lr_scale/freeze_backbone_epochs need a head, but {type(net).__name__} "
            "has no linear layer; set model.backbone_lr_scale=1 model.freeze_backbone_epochs=0."
        )
    return linear[-1]


def balanced_weights(counts: Sequence[int] | None) -> Tensor:
    """Class weights n / (k * n_c), scikit-learn's `balanced`: each class weighs as much in the
    loss as every other, however few its images."""
    if not counts or min(counts) == 0:
        raise CellclsError(
            f"model.class_weights=balanced needs training images of every class; got {counts}"
        )
    counts_t = torch.tensor(counts, dtype=torch.float)
    return counts_t.sum() / (len(counts) * counts_t)
