"""Networks and the LightningModule that trains them; nothing here touches files."""

from cellcls.models.classifier import CellClassifier
from cellcls.models.smallcnn import SmallCNN

__all__ = ["CellClassifier", "SmallCNN"]
