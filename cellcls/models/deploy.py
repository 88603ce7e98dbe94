"""The model as an exported graph takes it: uint8 RGB images in, class probabilities out."""

from __future__ import annotations

from torch import Tensor, nn


class UInt8Probabilities(nn.Module):
    """`classifier` (a `CellClassifier`) from N x H x W x 3 uint8 RGB images (the layout numpy,
    PIL and OpenCV hand out) to class probabilities: the scaling to [0, 1] and the
    normalisation happen in its `forward`, and its temperature divides the logits, so they
    travel inside the ONNX graph."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.probabilities(self.classifier(images.permute(0, 3, 1, 2)))
