"""VGG-16 with BatchNorm for CIFAR: Simonyan & Zisserman, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", ICLR 2015 (configuration D), with BN after every conv
(Ioffe & Szegedy 2015), as used in the online-distillation tables (OKDDip; PCL).

13 3x3 conv-BN-ReLU layers (64,64, M, 128,128, M, 256x3, M, 512x3, M, 512x3, M; M = 2x2 max
pool) take a 32x32 image to 512x1x1; global average pooling (the identity at 32x32) gives the
512-d feature and one linear layer classifies it. 14.7M parameters (14.72M on CIFAR-10,
14.77M on CIFAR-100). Convs have no bias (each is followed by BN). Note: OKDDip's code puts two
extra 512x512 fully connected layers before the classifier (15.3M); this is the 14.7M variant.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.layers import PeerBatchNorm2d, PeerConv2d, PeerLinear, init_conv_bn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """forward: `x [B, P*3, 32, 32]` -> `(logits [B, P*num_classes], feature [B, P*512])`."""

    def __init__(self, cfg: tuple, num_classes: int, peers: int = 1):
        super().__init__()
        self.num_classes, self.peers = num_classes, peers
        layers, in_ch = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [PeerConv2d(in_ch, v, 3, padding=1, peers=peers),
                           PeerBatchNorm2d(v, peers), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_ch
        self.fc = PeerLinear(in_ch, num_classes, peers=peers)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.features(x).mean(dim=(2, 3))
        return self.fc(feature), feature


def vgg16(num_classes: int, peers: int = 1) -> VGG:
    return VGG(VGG16_CFG, num_classes, peers)
