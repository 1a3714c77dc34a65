"""DenseNet for CIFAR: Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional
Networks", CVPR 2017 — the basic DenseNet (L=40, k=12) of its Table 2 (1.0M parameters), as
listed in the online-distillation tables (OKDDip; PCL) as DenseNet-40-12.

A 3x3 stem conv to 16 channels; three dense blocks of 12 layers (BN-ReLU-conv3x3 producing
k=12 channels, concatenated to the block's input); between blocks a transition
BN-ReLU-conv1x1 (same width, no compression) and 2x2 average pooling; a final BN-ReLU and
global average pooling give the 448-d feature (16 + 3*12*12), then one linear layer. No
bottlenecks, no compression, no dropout (the paper drops out only without augmentation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import PeerBatchNorm2d, PeerConv2d, PeerLinear, init_conv_bn, peer_cat


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3, then concatenation per peer: `[B, P*C, H, W]` -> `[B, P*(C+k), H, W]`."""

    def __init__(self, in_channels: int, growth: int, peers: int):
        super().__init__()
        self.peers = peers
        self.bn = PeerBatchNorm2d(in_channels, peers)
        self.conv = PeerConv2d(in_channels, growth, 3, padding=1, peers=peers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return peer_cat([x, self.conv(F.relu(self.bn(x)))], self.peers)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2: `[B, P*C, H, W]` -> `[B, P*C_out, H/2, W/2]`."""

    def __init__(self, in_channels: int, out_channels: int, peers: int):
        super().__init__()
        self.bn = PeerBatchNorm2d(in_channels, peers)
        self.conv = PeerConv2d(in_channels, out_channels, 1, peers=peers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """DenseNet-(3n+4), growth k, no bottleneck/compression.

    forward: `x [B, P*3, H, W]` -> `(logits [B, P*num_classes], feature [B, P*(16+3nk)])`.
    """

    def __init__(self, depth: int, growth: int, num_classes: int, peers: int = 1):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        self.depth, self.growth, self.num_classes, self.peers = depth, growth, num_classes, peers
        self.conv1 = PeerConv2d(3, 16, 3, padding=1, peers=peers)
        blocks, channels = [], 16
        for b in range(3):
            for _ in range(n):
                blocks.append(DenseLayer(channels, growth, peers))
                channels += growth
            if b < 2:
                blocks.append(Transition(channels, channels, peers))
        self.blocks = nn.Sequential(*blocks)
        self.bn = PeerBatchNorm2d(channels, peers)
        self.feature_dim = channels
        self.fc = PeerLinear(channels, num_classes, peers=peers)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(self.conv1(x))
        feature = F.relu(self.bn(x)).mean(dim=(2, 3))
        return self.fc(feature), feature


def densenet40_12(num_classes: int, peers: int = 1) -> DenseNet:
    return DenseNet(40, 12, num_classes, peers)
