"""Random augmentation of whole training batches on the training device, one draw per image.

torchvision's `transforms.v2` draws one set of parameters per call (checked with torchvision
0.29.1: `v2.RandomRotation(180)` on an (N, C, H, W) batch turns every image by the same angle),
so it cannot augment a batch with a different rotation for each image. Kornia's augmentation
module draws per image (`same_on_batch=False`) and runs on whatever device the batch is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from cellcls.errors import is_number, require


class BatchAugment(nn.Module):
    """Flips, rotation by any angle, small scale and shift, colour and stain jitter, and optional
    random erasing, each drawn independently for every image of a batch.

    A cell has no up, so rotations cover the full circle; `padding_mode="reflection"` fills the
    corners a rotation uncovers with the image's own background rather than black. Jitter
    strengths follow torchvision's ColorJitter (a factor drawn in [1 - s, 1 + s]; hue a shift in
    [-h, h] of a full turn). Batches keep their dtype and shape: uint8 (0-255) comes back uint8,
    float images (in [0, 1]) come back float. The module has no weights; the classifier applies it
    to training batches only.
    """

    def __init__(
        self,
        flips: bool = True,
        degrees: float = 180.0,
        translate: float = 0.0,
        scale: Sequence[float] = (1.0, 1.0),
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        erasing: float = 0.0,
        padding_mode: str = "reflection",
    ) -> None:
        super().__init__()
        for name, value, high in (
            ("degrees", degrees, 180),
            ("translate", translate, 0.5),
            ("brightness", brightness, 1),
            ("contrast", contrast, 1),
            ("saturation", saturation, 1),
            ("hue", hue, 0.5),
            ("erasing", erasing, 1),
        ):
            ok = is_number(value) and 0 <= value <= high
            require(ok, f"model.augment.{name}", value, f"a number in [0, {high}]")
        lo, hi = scale
        require(
            0 < lo <= hi, "model.augment.scale", list(scale), "[low, high] with 0 < low <= high"
        )
        modes = ("zeros", "border", "reflection")
        require(
            padding_mode in modes, "model.augment.padding_mode", padding_mode, " or ".join(modes)
        )
        steps: list[nn.Module] = []
        if flips:
            steps += [K.RandomHorizontalFlip(), K.RandomVerticalFlip()]
        if degrees or translate or (lo, hi) != (1, 1):
            steps.append(
                K.RandomAffine(
                    degrees=degrees,
                    translate=(translate, translate) if translate else None,
                    scale=(lo, hi) if (lo, hi) != (1, 1) else None,
                    padding_mode=padding_mode,
                    p=1.0,
                )
            )
        if brightness or contrast or saturation or hue:
            steps.append(K.ColorJitter(brightness, contrast, saturation, hue, p=1.0))
        if erasing:
            steps.append(K.RandomErasing(p=erasing))
        self.steps = K.AugmentationSequential(*steps) if steps else None

    def forward(self, x: Tensor) -> Tensor:
        if self.steps is None:
            return x
        # In float32 even inside a mixed-precision training step.
        with torch.autocast(x.device.type, enabled=False):
            out = self.steps(x.float() / 255 if x.dtype == torch.uint8 else x.float())
        if x.dtype == torch.uint8:
            return out.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        return out.clamp(0, 1).to(x.dtype)
