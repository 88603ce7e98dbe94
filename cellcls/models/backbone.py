"""torchvision classification networks by name, for small inputs, with weights from a local file."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from cellcls.core.errors import CellclsError, require

log = logging.getLogger(__name__)


def torchvision_net(
    name: str,
    num_classes: int = 4,
    small_input: bool = True,
    weights: str | None = None,
) -> nn.Module:
    """`torchvision.models.get_model(name, weights=None, num_classes=...)`, adapted and loaded.

    `small_input` halves the stem's downsampling, for crops of about 128px or less: a resnet
    loses its max-pool, other networks' first convolution takes half its stride (efficientnet,
    mobilenet: 2 -> 1; convnext: 4 -> 2). Weight shapes do not change, so ImageNet weights still
    load. `weights` is a state dict saved with `torch.save` (nothing here can download): tensors
    whose shape differs from the network's (the 1000-class head) are left as initialised.
    """
    names = torchvision.models.list_models(module=torchvision.models)
    require(
        name in names,
        "model.net.name",
        name,
        "a torchvision classification model, one of " + ", ".join(names),
    )
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if small_input:
        _halve_stem(net, name)
    if weights is not None:
        load_weights(net, Path(weights).expanduser())
    return net


def _halve_stem(net: nn.Module, name: str) -> None:
    if isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):  # resnet, resnext, wide_resnet
        net.maxpool = nn.Identity()
        return
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.stride[0] < 2 or name.startswith(("vit", "swin", "maxvit")):
        raise CellclsError(
            f"model.net.small_input=true does not know how to adapt {name}'s stem; "
            "set model.net.small_input=false."
        )
    stride = conv.stride[0] // 2
    conv.stride = (stride, stride)
    conv.padding = ((conv.kernel_size[0] - stride) // 2,) * 2


def load_weights(net: nn.Module, path: Path) -> None:
    """Load the state dict saved at `path` into `net`; tensors of another shape are skipped."""
    if not path.is_file():
        raise CellclsError(f"model.net.weights='{path}' does not exist (or is not a file).")
    if not zipfile.is_zipfile(path):
        raise CellclsError(f"model.net.weights='{path}' is not a state dict saved with torch.save.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CellclsError(
            f"model.net.weights='{path}' was refused: it holds more than tensors and plain values, "
            "and loading it could run code from the file. Save model.state_dict() instead."
        ) from None
    except Exception as err:  # torch raises several types for files it cannot read
        raise CellclsError(f"model.net.weights='{path}' could not be read: {err}") from None
    ok = isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())
    if not ok:
        raise CellclsError(
            f"model.net.weights='{path}' is not a state dict (a dict of tensors, e.g. "
            "torch.save(model.state_dict(), path))."
        )
    own = net.state_dict()
    skipped = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(own.keys() - state.keys() - set(skipped))
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CellclsError(
            f"model.net.weights='{path}' does not fit model.net.name's network: "
            f"{len(missing)} missing tensor(s) {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]} (weights of another network?)."
        )
    net.load_state_dict(state, strict=False)
    log.info(
        "Loaded %d tensors from %s; kept the new initialisation of %s (shapes differ: a new head).",
        len(state),
        path,
        ", ".join(skipped) or "none",
    )
