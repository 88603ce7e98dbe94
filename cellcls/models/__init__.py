"""Networks and the LightningModule that trains them; nothing here touches files, except the
pretrained weights a user names (`model.net.weights`, read in `cellcls.models.backbone` and
`timm_net`)."""

from cellcls.models.augment import BatchAugment
from cellcls.models.backbone import torchvision_net
from cellcls.models.classifier import CellClassifier
from cellcls.models.deploy import UInt8Probabilities
from cellcls.models.ensemble import MeanProbabilities
from cellcls.models.smallcnn import SmallCNN
from cellcls.models.smallcnn_bn import SmallCNNBN
from cellcls.models.timm_net import timm_net

__all__ = [
    "BatchAugment",
    "CellClassifier",
    "MeanProbabilities",
    "SmallCNN",
    "SmallCNNBN",
    "UInt8Probabilities",
    "timm_net",
    "torchvision_net",
]
