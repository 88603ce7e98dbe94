"""`gradcam.png`: Grad-CAM heat maps over a few images, to see what the network looks at (the
nucleus, or the red cells around it).

The heat map of an image is pytorch-grad-cam's `GradCAM` for the class the model predicted, at
one layer picked by `target_layer` for any network: the last module of `model.net` to finish
that outputs a 4-D feature map larger than 1x1 and runs once per forward pass. That is the output
of the last convolutional stage before global pooling or flattening (smallcnn, smallcnn_bn,
efficientnet_b0, convnext_tiny: `features`; resnet18: `layer4`); where that stage is 1x1 at a
small image size, the last stage that still has a map.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from cellcls.core.errors import CellclsError

log = logging.getLogger(__name__)


def target_layer(model: nn.Module, images: Tensor) -> tuple[str, nn.Module]:
    """The layer Grad-CAM reads (see the module's docstring) and its name in `model.net` (in
    `model` itself when it has no `net`), found by running `model` on one of `images`."""
    net = getattr(model, "net", model)
    finished: list[str] = []  # names of modules with a spatial 4-D output, in the order they end
    calls: Counter[str] = Counter()

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] += 1
            if isinstance(output, Tensor) and output.dim() == 4 and output[0, 0].numel() > 1:
                finished.append(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if n]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    once = [n for n in finished if calls[n] == 1]  # a module run twice has two maps
    if not once:
        raise CellclsError(
            f"report.gradcam=true needs a network with a convolutional feature map; "
            f"{type(net).__name__} has no module whose output is a 4-D map larger than 1x1."
        )
    return once[-1], net.get_submodule(once[-1])


def heat_maps(model: nn.Module, images: Tensor, targets: Sequence[int]) -> tuple[np.ndarray, str]:
    """Grad-CAM maps (N x H x W, each scaled to [0, 1]) of `images` (uint8, or float in [0, 1],
    N x 3 x H x W) for the classes `targets`, and the layer's name.

    Runs `model`'s own forward (a `CellClassifier` normalises its input) on its device, in eval
    mode, with gradients even inside Lightning's inference mode; the weights' `requires_grad`
    and the training mode are restored afterwards, and the weights get no gradients.
    """
    # Imported when a figure is asked for: pytorch-grad-cam loads scikit-learn (seconds).
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    training = model.training
    wanted = [p.requires_grad for p in model.parameters()]
    device = next(model.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        x = images.to(device).clone()  # a clone: a tensor made in inference mode has no autograd
        x = (x.float() / 255 if x.dtype == torch.uint8 else x.float()).requires_grad_(True)
        model.eval()
        try:
            name, layer = target_layer(model, x)
            model.requires_grad_(False)  # gradients reach the layer through the input instead
            with GradCAM(model=model, target_layers=[layer]) as cam:
                maps = cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            model.train(training)
            for p, w in zip(model.parameters(), wanted, strict=True):
                p.requires_grad_(w)
    return maps, name


def gradcam_rows(
    probs: np.ndarray, classes: Sequence[str], labels: np.ndarray | None, per_class: int
) -> list[list[int]]:
    """Rows of image indices for the figure, `per_class` to a row: with labels, the most
    confident errors (`per_class` per class at most), then a row per class of its most
    confident correct images; without labels (predict), a row per predicted class of its most
    confident images. Classes without such images get no row."""
    preds, confidence = probs.argmax(1), probs.max(1)

    def most_confident(mask: np.ndarray, n: int) -> list[int]:
        picked = np.flatnonzero(mask)
        return picked[np.argsort(-confidence[picked], kind="stable")][:n].tolist()

    rows: list[list[int]] = []
    if labels is not None:
        errors = most_confident(preds != labels, per_class * len(classes))
        rows += [errors[k : k + per_class] for k in range(0, len(errors), per_class)]
    for c in range(len(classes)):
        mask = preds == c if labels is None else (preds == c) & (labels == c)
        rows.append(most_confident(mask, per_class))
    return [r for r in rows if r]


def write_gradcam(
    path: str | Path,
    model: nn.Module,
    load: Callable[[list[int]], Tensor],
    probs: np.ndarray,
    classes: Sequence[str],
    labels: np.ndarray | None = None,
    per_class: int = 3,
    paths: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Write `path` (gradcam.png) for the images `gradcam_rows` picks; return their maps and
    the layer's name.

    `load(indices)` gives those images (uint8, N x 3 x H x W) of the ones `probs` (and `labels`,
    when known) describe; only they go through the network, each with its predicted class.
    With `paths` (the images' files), each title ends with its file's name.
    """
    rows = gradcam_rows(probs, classes, labels, per_class)
    picked = [i for row in rows for i in row]
    preds, confidence = probs.argmax(1), probs.max(1)
    if picked:
        images = load(picked)
        maps, layer = heat_maps(model, images, preds[picked])
    else:
        images, maps, layer = torch.zeros(0, 3, 1, 1, dtype=torch.uint8), np.zeros((0, 1, 1)), "-"
    titles = [
        (f"{classes[labels[i]]} → " if labels is not None else "")
        + f"{classes[preds[i]]} ({confidence[i]:.2f})"
        + (f"\n{Path(paths[i]).name}" if paths is not None else "")
        for i in picked
    ]
    heading = f"Grad-CAM at {layer}, for the predicted class: " + (
        "most confident errors, then correct images per class"
        if labels is not None
        else "most confident images per predicted class"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_gradcam(images, maps, titles, [len(r) for r in rows], per_class, heading, Path(path))
    log.info("Grad-CAM of %d image(s) at %s: %s", len(picked), layer, path)
    return maps, layer


def plot_gradcam(
    images: Tensor,
    maps: np.ndarray,
    titles: Sequence[str],
    row_lengths: Sequence[int],
    cols: int,
    heading: str,
    path: Path,
) -> None:
    """Each image beside its heat map over it, titled, in rows of the given lengths."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    n_rows = max(len(row_lengths), 1)
    fig = Figure(figsize=(3.4 * cols, 2.1 * n_rows + 0.4), layout="constrained")
    fig.suptitle(heading, fontsize=10)
    if not len(titles):
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no images", ha="center", va="center", fontsize=16)
        ax.axis("off")
    k = 0
    for r, length in enumerate(row_lengths):
        for c in range(length):
            rgb = images[k].permute(1, 2, 0).cpu().numpy()
            overlay = show_cam_on_image(np.float32(rgb) / 255, maps[k], use_rgb=True)
            ax = fig.add_subplot(n_rows, cols, r * cols + c + 1)
            ax.imshow(np.concatenate([rgb, overlay], axis=1))
            ax.set_title(titles[k], fontsize=8)
            ax.axis("off")
            k += 1
    fig.savefig(path, dpi=80)
