"""An ensemble of trained classifiers as one network: the average of their class probabilities."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mean_probabilities(logits: Sequence[Tensor]) -> Tensor:
    """The log of the class probabilities averaged over several predictions of one batch (views
    of it, or models): a softmax of it is the average."""
    log_probs = torch.stack([z.float().log_softmax(1) for z in logits])
    return log_probs.logsumexp(0) - math.log(len(logits))


class MeanProbabilities(nn.Module):
    """Images in [0, 1] -> log of the members' class probabilities averaged.

    Each member is a trained `CellClassifier`, which normalises the images with its own
    statistics. The output is a log-probability, so a softmax of it gives the average and a
    cross-entropy of it is the ensemble's loss: wrapped in a `CellClassifier` (mean 0, std 1),
    the ensemble tests, predicts and takes `tta` like a single model.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        # Each member's own calibration (`temperature`, 1 for a model without it) first, in float32
        # as `CellClassifier.probabilities` does.
        return mean_probabilities(
            [m(x).float() / getattr(m, "temperature", 1.0) for m in self.members]
        )
