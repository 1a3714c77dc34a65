"""Wide ResNet for CIFAR: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, at the
depth-20 / widen-8 setting (WRN-20-8) used by the online-distillation tables (OKDDip, Chen et al.
AAAI 2020; PCL, Wu & Gong AAAI 2021; DLB, Shen et al. CVPR 2022).

Depth 20 is not of the WRN paper's 6n+4 form; it is read as the CIFAR ResNet-20 layout (a 3x3
stem conv to 16 channels, three stages of 3 blocks) with every stage widened 8x:
128, 256, 512 channels. Blocks are WRN's pre-activation basic blocks (BN-ReLU-conv3x3,
BN-ReLU-conv3x3) with a 1x1 projection shortcut where the shape changes, and a final BN-ReLU
before global average pooling; no dropout. That gives 17.2M parameters on CIFAR-100 (17.15M on
CIFAR-10): ResNet-20's 0.27M times 8^2, the figure quoted for WRN-20-8 in those tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import PeerBatchNorm2d, PeerConv2d, PeerLinear, init_conv_bn


class WideBasicBlock(nn.Module):
    """Pre-activation block: `[B, P*in_planes, H, W]` -> `[B, P*planes, H/stride, W/stride]`."""

    def __init__(self, in_planes: int, planes: int, stride: int, peers: int):
        super().__init__()
        self.bn1 = PeerBatchNorm2d(in_planes, peers)
        self.conv1 = PeerConv2d(in_planes, planes, 3, stride=stride, padding=1, peers=peers)
        self.bn2 = PeerBatchNorm2d(planes, peers)
        self.conv2 = PeerConv2d(planes, planes, 3, stride=1, padding=1, peers=peers)
        self.shortcut = (PeerConv2d(in_planes, planes, 1, stride=stride, peers=peers)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        # As in the WRN reference code: the projection sees the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-(6n+2)-k on the CIFAR-ResNet layout.

    forward: `x [B, P*3, H, W]` -> `(logits [B, P*num_classes], feature [B, P*64k])`,
    feature = globally average-pooled output of the final BN-ReLU.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, peers: int = 1):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"WRN depth must be 6n+2 on the CIFAR-ResNet layout, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.widen, self.num_classes, self.peers = depth, widen, num_classes, peers
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.feature_dim = widths[-1]
        self.conv1 = PeerConv2d(3, 16, 3, padding=1, peers=peers)
        layers, in_planes = [], 16
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, stride if i == 0 else 1, peers))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = PeerBatchNorm2d(widths[-1], peers)
        self.fc = PeerLinear(widths[-1], num_classes, peers=peers)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        feature = F.relu(self.bn(x)).mean(dim=(2, 3))
        return self.fc(feature), feature


def wrn20_8(num_classes: int, peers: int = 1) -> WideResNet:
    return WideResNet(20, 8, num_classes, peers)
