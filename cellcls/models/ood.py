"""Out-of-distribution scores of a network's outputs, in torch (so one implementation serves
calibration, eval, predict, the Python API and the ONNX graph).

Three scores, each higher for an image less like the training images:

- `msp`: 1 - the top calibrated probability (Hendrycks and Gimpel 2017);
- `energy`: -T logsumexp(logits / T) (Liu et al. 2020), which keeps the logits' scale that the
  softmax throws away;
- `mahalanobis`: the smallest squared Mahalanobis distance of the penultimate features (the
  head's input) to a class mean, with one covariance shared by the classes, fitted on the
  training images (Lee et al. 2018; `cellcls.reports.ood.fit_gaussian`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from cellcls.models.recipe import head_of

SCORES = ("msp", "energy", "mahalanobis")


@contextmanager
def catch_features(net: nn.Module) -> Iterator[list[Tensor]]:
    """While open, the penultimate features of each forward pass of `net` (its head's input,
    `head_of`) are appended to the list it yields."""
    caught: list[Tensor] = []
    hook = head_of(net).register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    try:
        yield caught
    finally:
        hook.remove()


def embed(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(penultimate features, logits) of `model` (a `CellClassifier`) on images `x`, from one
    forward pass."""
    with catch_features(model.net) as caught:
        logits = model(x)
    return caught[-1].flatten(1).float(), logits.float()


def scores(
    features: Tensor, logits: Tensor, temperature: float, gaussian: dict[str, Any] | None
) -> dict[str, Tensor]:
    """Each score of `SCORES` per image (`mahalanobis` only with a fitted `gaussian`)."""
    z = logits.float() / temperature
    out = {"msp": 1 - z.softmax(1).amax(1), "energy": -temperature * torch.logsumexp(z, 1)}
    if gaussian is not None:
        means = torch.as_tensor(gaussian["means"], dtype=torch.float32, device=features.device)
        precision = torch.as_tensor(
            gaussian["precision"], dtype=torch.float32, device=features.device
        )
        d = features.float()[:, None, :] - means[None]  # N x classes x features
        kind = d.device.type
        # In float32 under autocast too: in bf16 the distance moves by ~1%. Not einsum: its
        # contraction-path search fixes the batch size in an exported graph.
        with (
            torch.autocast(kind, enabled=False)
            if torch.is_autocast_enabled(kind)
            else nullcontext()
        ):
            out["mahalanobis"] = ((d @ precision) * d).sum(-1).amin(1)
    return out
