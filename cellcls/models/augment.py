"""Random augmentation of whole training batches on the training device, one draw per image.

torchvision's `transforms.v2` draws one set of parameters per call (checked with torchvision
0.29.1: `v2.RandomRotation(180)` on an (N, C, H, W) batch turns every image by the same angle),
so it cannot augment a batch with a different rotation for each image. Kornia's augmentation
module draws per image, but applies each transform as its own pass over the batch (on a CPU its
flips alone cost as much as the rotation, its hue shift more than the rest together). Here each
image's flips, rotation, zoom and shift are one affine map, so a batch is resampled once
(`F.grid_sample`); brightness, contrast, saturation and hue are linear in the colour, so they are
one 3x3 matrix per image, applied in one pass; erasing is a mask. Plain torch, on any device, and
several times faster than the same augmentation as a Kornia sequence on a CPU (README, "White-cell
crops, networks, augmentation, recipe").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellcls.core.errors import is_number, require


def _uniform(n: int, low: float, high: float, like: Tensor) -> Tensor:
    return torch.empty(n, device=like.device).uniform_(low, high)


# RGB to YIQ (NTSC): Y is ITU-R 601 luma, as torchvision's `rgb_to_grayscale`; a hue shift is
# a rotation of the (I, Q) chroma plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class BatchAugment(nn.Module):
    """Flips, rotation by any angle, small scale and shift, colour and stain jitter, and optional
    random erasing, each drawn independently for every image of a batch.

    A cell has no up, so rotations cover the full circle; `padding_mode="reflection"` fills the
    corners a rotation uncovers with the image's own background rather than black. Jitter
    strengths follow torchvision's ColorJitter (a factor drawn in [1 - s, 1 + s]; hue a shift in
    [-h, h] of a full turn, here a rotation of YIQ chroma, not of HSV hue). Erasing blacks out one
    rectangle of 2-33% of the image, aspect 0.3-3.3, in a fraction `erasing` of the images, as
    torchvision's RandomErasing. Batches keep their dtype and shape: uint8 (0-255) comes back uint8,
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
        self.flips, self.degrees, self.translate, self.scale = flips, degrees, translate, (lo, hi)
        self.jitter = (brightness, contrast, saturation, hue)
        self.padding_mode, self.erasing = padding_mode, erasing
        yiq = torch.tensor(_YIQ)  # not saved in checkpoints; moves with the module
        self.register_buffer("yiq", yiq, persistent=False)
        self.register_buffer("yiq_inv", torch.linalg.inv(yiq), persistent=False)

    def grid(self, x: Tensor) -> Tensor:
        """A per-image sampling grid for `F.grid_sample`: for each output pixel, where in the
        input it comes from (flip . rotation / zoom . (output - shift), about the centre)."""
        n, _, h, w = x.shape
        angle = _uniform(n, -self.degrees, self.degrees, x) * (math.pi / 180)
        zoom = _uniform(n, *self.scale, x)
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        sx, sy = torch.ones(2, n, device=x.device)
        if self.flips:
            sx, sy = torch.where(torch.rand(2, n, device=x.device) < 0.5, -1.0, 1.0)
        shift_x, shift_y = (_uniform(n, -2, 2, x) * self.translate for _ in range(2))
        # Pixel-centre coordinates in [-1, 1] (align_corners=False), in pixel proportions.
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device).view(1, 1, w) * w
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device).view(1, h, 1) * h
        xs = xs - (shift_x * w).view(n, 1, 1)
        ys = ys - (shift_y * h).view(n, 1, 1)
        c, s = cos.view(n, 1, 1), sin.view(n, 1, 1)
        gx = sx.view(n, 1, 1) * (c * xs + s * ys) / w
        gy = sy.view(n, 1, 1) * (c * ys - s * xs) / h
        return torch.stack([gx, gy], -1)

    def colour(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image (N, 3, 3) matrices and (N, 3, 1) offsets: brightness, then contrast (a
        blend with the image's mean luma), saturation (a blend with each pixel's luma), hue."""
        n = len(x)
        luma, ones = self.yiq[:1].view(1, 1, 3), torch.ones(1, 3, 1, device=x.device)
        b, c, s = (_uniform(n, 1 - v, 1 + v, x).view(n, 1, 1) for v in self.jitter[:3])
        angle = _uniform(n, -self.jitter[3], self.jitter[3], x) * (2 * math.pi)
        rot = torch.zeros(n, 3, 3, device=x.device)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, angle.cos(), angle.cos()
        rot[:, 1, 2], rot[:, 2, 1] = -angle.sin(), angle.sin()
        hue_matrix = self.yiq_inv @ rot @ self.yiq  # keeps luma, so greys stay grey
        eye = torch.eye(3, device=x.device)
        mean = (luma @ x.mean((2, 3)).unsqueeze(2)) * b  # mean luma after the brightness
        matrix = hue_matrix @ (b * c * (s * eye + (1 - s) * ones @ luma))
        offset = (1 - c) * mean * ones
        return matrix, offset

    def erase(self, x: Tensor) -> Tensor:
        """Black out one random rectangle in a random `erasing` fraction of the images."""
        n, _, h, w = x.shape
        area = _uniform(n, 0.02, 0.33, x) * h * w
        aspect = _uniform(n, math.log(0.3), math.log(3.3), x).exp()
        eh = (area * aspect).sqrt().clamp(1, h)
        ew = (area / aspect).sqrt().clamp(1, w)
        top = torch.rand(n, device=x.device) * (h - eh)
        left = torch.rand(n, device=x.device) * (w - ew)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (
            (rows >= top.view(n, 1, 1))
            & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1))
            & (cols < (left + ew).view(n, 1, 1))
            & (torch.rand(n, 1, 1, device=x.device) < self.erasing)
        )
        return x.masked_fill_(inside.unsqueeze(1), 0.0)

    def forward(self, x: Tensor) -> Tensor:
        n, ch, h, w = x.shape
        # In float32 even inside a mixed-precision training step.
        with torch.autocast(x.device.type, enabled=False):
            out = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if self.flips or self.degrees or self.translate or self.scale != (1, 1):
                out = F.grid_sample(
                    out, self.grid(out), padding_mode=self.padding_mode, align_corners=False
                )
            if any(self.jitter):
                matrix, offset = self.colour(out)
                out = torch.baddbmm(offset, matrix, out.reshape(n, ch, h * w)).view(n, ch, h, w)
                out = out.clamp_(0, 1)
            if self.erasing:
                out = self.erase(out)
        if x.dtype == torch.uint8:
            return out.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
        return out.clamp_(0, 1).to(x.dtype)
