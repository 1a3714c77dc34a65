"""CIFAR ResNets with option-A shortcuts: He, Zhang, Ren, Sun, "Deep Residual Learning for
Image Recognition", CVPR 2016, section 4.2 — the resnet20/32/56/110 of the online-distillation
literature (ONE, Lan et al. 2018; OKDDip, Chen et al. 2020; PCL, Wu & Gong 2021).

Depth 6n+2: a 3x3 stem conv to 16 channels, three stages of n basic blocks with 16, 32, 64
channels (stride 2 at the first block of stages 2 and 3), global average pooling, a linear
classifier. Shortcuts are identity; where the shape changes they subsample by 2 and pad the
new channels with zeros ("option A"), so the network has no projection parameters:
ResNet-32 has 0.46M parameters on CIFAR-10 (He et al., Table 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import PeerBatchNorm2d, PeerConv2d, PeerLinear, init_conv_bn, peer_pad_channels


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (option-A) shortcut, then ReLU.

    `[B, P*in_planes, H, W]` -> `[B, P*planes, H/stride, W/stride]`.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, peers: int):
        super().__init__()
        self.peers = peers
        self.conv1 = PeerConv2d(in_planes, planes, 3, stride=stride, padding=1, peers=peers)
        self.bn1 = PeerBatchNorm2d(planes, peers)
        self.conv2 = PeerConv2d(planes, planes, 3, stride=1, padding=1, peers=peers)
        self.bn2 = PeerBatchNorm2d(planes, peers)
        self.stride = stride
        self.pad = planes - in_planes                # extra channels the shortcut fills with 0

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = peer_pad_channels(x, self.peers, self.pad // 2, self.pad - self.pad // 2)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2), option A.

    forward: `x [B, P*3, H, W]` (P = `peers`, 1 for a single network) ->
    `(logits [B, P*num_classes], feature [B, P*64])`, feature = globally average-pooled output
    of the last stage (before the classifier). dtype follows the input (autocast aware).
    """

    def __init__(self, depth: int, num_classes: int, peers: int = 1):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_classes, self.peers = depth, num_classes, peers
        self.feature_dim = 64
        self.conv1 = PeerConv2d(3, 16, 3, padding=1, peers=peers)
        self.bn1 = PeerBatchNorm2d(16, peers)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, peers))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = PeerLinear(64, num_classes, peers=peers)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feature = x.mean(dim=(2, 3))
        return self.fc(feature), feature


def resnet20(num_classes: int, peers: int = 1) -> CifarResNet:
    return CifarResNet(20, num_classes, peers)


def resnet32(num_classes: int, peers: int = 1) -> CifarResNet:
    return CifarResNet(32, num_classes, peers)


def resnet56(num_classes: int, peers: int = 1) -> CifarResNet:
    return CifarResNet(56, num_classes, peers)


def resnet110(num_classes: int, peers: int = 1) -> CifarResNet:
    return CifarResNet(110, num_classes, peers)
