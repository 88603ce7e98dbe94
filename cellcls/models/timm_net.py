"""timm networks by name (`model=timm model.net.name=NAME`), from scratch or pretrained."""

from __future__ import annotations

import pickle
from typing import Any

from torch import nn

from cellcls.core.errors import CellclsError
from cellcls.models.backbone import (
    IMAGENET,
    REFUSED,
    check_file,
    download,
    halve_stem,
    normalization,
    weights_file,
)


def timm_net(
    name: str,
    num_classes: int = 4,
    small_input: bool = True,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, num_classes=...)`, adapted to small inputs and loaded.

    `name` is any timm architecture (`timm.list_models()`), optionally with a weights tag
    (`resnet50.a1_in1k`). `weights`: `imagenet` downloads the default pretrained weights of
    `name` (`pretrained=True`: Hugging Face hub or the weights' URL), a tag (`a1_in1k`) those of
    `name.tag`; any other value is a weights file (a `torch.save` state dict or a `.safetensors`
    file of the 1000-class model), read offline through timm's own loader
    (`pretrained_cfg_overlay=dict(file=PATH)`), which drops a classifier of another number of
    classes and adapts nothing else. Pretrained, the network carries its weights' mean and std
    (`pretrained_cfg`). `small_input` halves the stem's downsampling as for the torchvision
    networks (`halve_stem`). Other keys (`drop_path_rate`, ...) go to `timm.create_model`.
    """
    import timm  # here, not at the top: importing timm takes 1-2 s that other models need not pay

    arch, _, tag = name.partition(".")
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if not timm.is_model(arch) or (tag and tag not in tags):
        raise CellclsError(
            f"model.net.name='{name}' is not accepted: a timm architecture (timm.list_models(), "
            "e.g. resnet18, convnext_atto, efficientnet_b0), optionally with one of its weights "
            "tags (resnet50.a1_in1k; timm.list_pretrained('resnet50.*'))."
        )
    build = {"num_classes": num_classes, **kwargs}
    net = _create(timm, name, arch, tags, weights, build)
    if weights is not None:
        cfg = net.pretrained_cfg
        net.normalization = normalization(cfg["mean"], cfg["std"], f"timm:{arch}.{cfg.get('tag')}")
    if small_input:
        halve_stem(net, name)
    return net


def _create(
    timm: Any, name: str, arch: str, tags: list[str], weights: str | None, build: dict[str, Any]
) -> nn.Module:
    """The timm network of `timm_net`, with its weights (none, downloaded, or a file)."""
    if weights is None:
        return timm.create_model(name, pretrained=False, **build)
    elif weights == IMAGENET or weights in tags:
        if not tags:
            raise CellclsError(
                f"model.net.weights={weights} is not accepted: timm has no pretrained weights of "
                f"{arch}; give a weights file, or model.net.weights=null."
            )
        full = name if weights == IMAGENET else f"{arch}.{weights}"
        save = (
            f"python -c \"import timm, torch; torch.save(timm.create_model('{full}', "
            f"pretrained=True).state_dict(), '{arch}.pth')\""
        )
        return download(lambda: timm.create_model(full, pretrained=True, **build), weights, save)
    else:
        path = weights_file(weights, [IMAGENET, *tags])
        check_file(path, safetensors=True)
        try:
            overlay = {"file": str(path)}
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **build)
        except pickle.UnpicklingError:
            raise CellclsError(f"model.net.weights='{path}' {REFUSED}") from None
        except TypeError:  # a key the architecture does not take: core.errors.unknown_key
            raise
        except Exception as err:  # a file of another network, or not a weights file
            why = " ".join(str(err).split())[:300] or type(err).__name__
            raise CellclsError(
                f"model.net.weights='{path}' does not fit timm's {name} (weights of another "
                f"network, or not a state dict?): {why}"
            ) from None
