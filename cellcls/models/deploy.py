"""The model as an exported graph takes it: uint8 RGB images in, class probabilities (and the
out-of-distribution scores, once fitted) out."""

from __future__ import annotations

from torch import Tensor, nn

from cellcls.models.ood import SCORES


class UInt8Probabilities(nn.Module):
    """`classifier` (a `CellClassifier`) from N x H x W x 3 uint8 RGB images (the layout numpy,
    PIL and OpenCV hand out) to class probabilities: the scaling to [0, 1] and the
    normalisation happen in its `forward`, and its temperature divides the logits, so they
    travel inside the ONNX graph. A classifier with a fitted OOD flag also returns its scores,
    in the order of `names`."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    @property
    def names(self) -> list[str]:
        """The outputs' names: `probabilities`, then each OOD score's."""
        ood = getattr(self.classifier, "ood", None)
        return ["probabilities"] + ([] if ood is None else list(SCORES))

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.classifier.outputs(images.permute(0, 3, 1, 2))
        if len(out) == 1:
            return out["probs"]
        return (out["probs"], *(out[k] for k in SCORES))
