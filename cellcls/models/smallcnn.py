"""The tutorial's two-block CNN, with Keras' initialisation."""

from __future__ import annotations

from torch import Tensor, nn

from cellcls.core.errors import is_whole, require


class SmallCNN(nn.Module):
    """Conv-ReLU-MaxPool twice, Flatten, Dense-ReLU, Dense; returns logits.

    With the defaults (200x200x3 -> 4 classes) it has 10,250,788 parameters, as the Keras
    model of the tutorial. Inputs are images in [0, 1].

    Each block max-pools before its ReLU: ReLU is monotonic, so max(relu(a), relu(b)) =
    relu(max(a, b)) and outputs and gradients are exactly the tutorial's, with the ReLU (and its
    backward pass) on a quarter of the values.
    """

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 200,
        in_channels: int = 3,
        channels: int = 32,
        hidden: int = 128,
        init: str = "keras",
    ) -> None:
        super().__init__()
        require(init in ("keras", "torch"), "model.net.init", init, "keras or torch")
        require(
            is_whole(image_size, 4),
            "data.image_size",
            image_size,
            "an integer >= 4 for SmallCNN (its two 2x2 max-pools)",
        )
        feat = image_size // 4  # two 2x2 max-pools, floor as Keras' 'valid' pooling
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * feat * feat, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        if init == "keras":
            self.apply(_keras_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as Keras' Conv2D and Dense layers start."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
