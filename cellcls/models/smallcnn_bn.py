"""The small CNN with BatchNorm: trains from scratch in a few epochs, at any input size."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cellcls.core.errors import is_number, is_whole, require


class SmallCNNBN(nn.Module):
    """Blocks of Conv3x3-BatchNorm-ReLU-MaxPool2 (one per width), global average pooling,
    dropout and a linear layer; returns logits.

    BatchNorm makes it train at learning rates where the tutorial's network stalls, and global
    pooling frees it from the input size (16x16 or more for the default four blocks). With the
    default widths (32, 64, 128, 256) it has about 390k parameters.
    """

    def __init__(
        self,
        num_classes: int = 4,
        widths: Sequence[int] = (32, 64, 128, 256),
        convs_per_block: int = 1,
        dropout: float = 0.2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        ok = len(widths) > 0 and all(is_whole(w, 1) for w in widths)
        require(ok, "model.net.widths", list(widths), "a list of integers >= 1")
        require(
            is_whole(convs_per_block, 1),
            "model.net.convs_per_block",
            convs_per_block,
            "an integer >= 1",
        )
        ok = is_number(dropout) and 0 <= dropout < 1
        require(ok, "model.net.dropout", dropout, "a number in [0, 1)")
        layers: list[nn.Module] = []
        for width in widths:
            for _ in range(convs_per_block):
                layers += [
                    nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
