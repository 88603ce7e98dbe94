"""torchvision classification networks by name, for small inputs, from scratch or pretrained; what
the timm networks (`cellcls.models.timm_net`) share with them: the stem for small inputs, the
weights file's checks, the download's error and the weights' normalisation.

A network built with pretrained weights carries `normalization`, the mean and std its weights
were trained with: `CellClassifier` normalises with them instead of the data's (a stem trained on
ImageNet expects ImageNet's statistics) and records them in its checkpoints.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchvision
from torch import Tensor, nn

from cellcls.core.errors import CellclsError, require

log = logging.getLogger(__name__)
T = TypeVar("T")

# ImageNet's per-channel statistics of [0, 1] images: every torchvision weight and most timm ones.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# `model.net.weights` that names the default pretrained weights of the network (downloaded).
IMAGENET = "imagenet"
REFUSED = (
    "was refused: it holds more than tensors and plain values, and loading it could run code "
    "from the file. Save model.state_dict() instead."
)


def normalization(mean: Sequence[float], std: Sequence[float], name: str) -> dict[str, Any]:
    """The record a pretrained network carries (as `net.normalization`): `imagenet` when its
    statistics are ImageNet's, else `name` (the weights')."""
    mean, std = [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
    same = mean == list(IMAGENET_MEAN) and std == list(IMAGENET_STD)
    return {"name": IMAGENET if same else name, "mean": mean, "std": std}


def torchvision_net(
    name: str,
    num_classes: int = 4,
    small_input: bool = True,
    weights: str | None = None,
) -> nn.Module:
    """`torchvision.models.get_model(name, weights=None, num_classes=...)`, adapted and loaded.

    `small_input` halves the stem's downsampling, for crops of about 128px or less (see
    `halve_stem`). Weight shapes do not change, so ImageNet weights still load. `weights`:
    `imagenet` (the model's DEFAULT weights) or one of its weights' names (`IMAGENET1K_V2`) is
    downloaded through torch.hub (`get_model_weights(name)`), with their own normalisation; any
    other value is a state dict saved with `torch.save`, taken to be ImageNet's (every torchvision
    weight is). Tensors whose shape differs from the network's (the 1000-class head) are left as
    initialised.
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
        halve_stem(net, name)
    if weights is None:
        return net
    enum = torchvision.models.get_model_weights(name)
    if weights == IMAGENET or weights in enum.__members__:
        chosen = enum.DEFAULT if weights == IMAGENET else enum[weights]
        net_call = f"torchvision.models.get_model('{name}', weights='{chosen.name}')"
        save = f'python -c "import torch, torchvision; torch.save({net_call}.state_dict(), '
        save += f"'{name}.pth')\""
        kwargs = {"progress": True, "weights_only": True}
        state = download(lambda: chosen.get_state_dict(**kwargs), weights, save)
        fit_state(net, state, f"torchvision's {name}.{chosen.name}")
        t = chosen.transforms()
        net.normalization = normalization(t.mean, t.std, f"torchvision:{name}.{chosen.name}")
    else:
        load_weights(net, weights_file(weights, [IMAGENET, *enum.__members__]))
        net.normalization = normalization(IMAGENET_MEAN, IMAGENET_STD, IMAGENET)
    return net


def halve_stem(net: nn.Module, name: str) -> None:
    """Halve the stem's downsampling: a resnet loses its max-pool, other networks' first
    convolution takes half its stride (efficientnet, mobilenet: 2 -> 1; convnext: 4 -> 2).
    Transformers (patch embeddings) are refused: their position embeddings fix the grid."""
    if isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):  # resnet, resnext, wide_resnet
        net.maxpool = nn.Identity()
        return
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    transformer = hasattr(net, "patch_embed") or name.startswith(("vit", "swin", "maxvit"))
    if conv is None or conv.stride[0] < 2 or transformer:
        raise CellclsError(
            f"model.net.small_input=true does not know how to adapt {name}'s stem; "
            "set model.net.small_input=false."
        )
    stride = conv.stride[0] // 2
    conv.stride = (stride, stride)
    if type(conv).__name__ != "Conv2dSame":  # timm's TF-style convolution pads as it runs
        conv.padding = ((conv.kernel_size[0] - stride) // 2,) * 2


def weights_file(weights: str, names: Sequence[str]) -> Path:
    """`model.net.weights` as a file's path; a value that names no file and does not look like a
    path (no `/`, no suffix) is taken for a mistyped name of pretrained weights: `names` are
    listed."""
    path = Path(weights).expanduser()
    if not path.exists() and "/" not in weights and not path.suffix:
        raise CellclsError(
            f"model.net.weights='{weights}' is not accepted: {', '.join(names)}, or the path of "
            "a weights file."
        )
    return path


def download(fetch: Callable[[], T], weights: str, save: str) -> T:
    """`fetch()`, the download of pretrained weights; its failure (no network) is one line that
    says how to bring the weights to this machine (`save`, a command for one that has one)."""
    try:
        return fetch()
    except CellclsError:
        raise
    except Exception as err:  # no network: URLError, OSError, huggingface_hub's errors, ...
        why = " ".join(str(err).split())[:200] or type(err).__name__
        raise CellclsError(
            f"model.net.weights={weights} needs a network to download the weights ({why}); save "
            f"them on a machine that has one with: {save} and pass model.net.weights=PATH."
        ) from None


def load_weights(net: nn.Module, path: Path) -> None:
    """Load the state dict saved at `path` into `net`; tensors of another shape are skipped."""
    check_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CellclsError(f"model.net.weights='{path}' {REFUSED}") from None
    except Exception as err:  # torch raises several types for files it cannot read
        raise CellclsError(f"model.net.weights='{path}' could not be read: {err}") from None
    ok = isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())
    if not ok:
        raise CellclsError(
            f"model.net.weights='{path}' is not a state dict (a dict of tensors, e.g. "
            "torch.save(model.state_dict(), path))."
        )
    fit_state(net, state, path)


def check_file(path: Path, safetensors: bool = False) -> None:
    """`path` exists and is a `torch.save` file (or, with `safetensors`, a `.safetensors` one)."""
    if not path.is_file():
        raise CellclsError(f"model.net.weights='{path}' does not exist (or is not a file).")
    if not zipfile.is_zipfile(path) and not (safetensors and path.suffix == ".safetensors"):
        raise CellclsError(f"model.net.weights='{path}' is not a state dict saved with torch.save.")


def fit_state(net: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Load `state` into `net`, keeping the new initialisation of tensors of another shape (a
    new head); missing or unexpected tensors (another network) are a `CellclsError`."""
    own = net.state_dict()
    skipped = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(own.keys() - state.keys() - set(skipped))
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CellclsError(
            f"model.net.weights='{source}' does not fit model.net.name's network: "
            f"{len(missing)} missing tensor(s) {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]} (weights of another network?)."
        )
    net.load_state_dict(state, strict=False)
    log.info(
        "Loaded %d tensors from %s; kept the new initialisation of %s (shapes differ: a new head).",
        len(state),
        source,
        ", ".join(skipped) or "none",
    )
