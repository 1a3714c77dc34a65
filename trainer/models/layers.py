"""Channel-block-aware layers: one model definition serves one network or P grouped peers.

Every model in this package is built from these primitives with a `peers` argument. With
`peers=1` they are the ordinary layers (`nn.Conv2d`, `nn.BatchNorm2d`, a linear layer, `F.pad`,
`torch.cat`) and the model is the plain CIFAR network. With `peers=P` the same code builds ONE
network that runs P independent copies side by side:

- channels are laid out in contiguous per-peer blocks: `[peer 0 channels | peer 1 | ...]`;
- convolutions have `groups = P * groups`, so peer p's outputs see only peer p's inputs;
- BatchNorm runs over the P*C channels, which is per peer and per channel (the statistics of a
  channel never mix peers);
- the classifier is a grouped linear layer (one batched matmul over a `[P, out, in]` weight);
- structural channel ops (zero channel padding of option-A shortcuts, DenseNet concatenation)
  act inside every peer block.

Every parameter and buffer of the grouped network is the concatenation along dim 0 of the P
peers' tensors (scalars such as `num_batches_tracked` are shared), so splitting a grouped
state dict into P single-network ones, and merging back, is an exact `chunk`/`cat` (see
`trainer.peers`). This is the grouped-convolution trick of ResNeXt (Xie et al. 2017) applied
to whole networks.

Memory format: the grouped channel ops keep channels-last tensors channels-last (they work in
an NHWC view), and keep contiguous tensors contiguous, so a channels-last model stays on the
fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PeerConv2d(nn.Conv2d):
    """`nn.Conv2d(in_channels, out_channels, ...)` for each of `peers` peers, as one grouped conv.

    Input `[B, peers*in_channels, H, W]` -> output `[B, peers*out_channels, H', W']` (any float
    dtype). Weight `[peers*out_channels, in_channels/groups, k, k]`: peer p owns rows
    `p*out_channels : (p+1)*out_channels`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False, peers: int = 1):
        super().__init__(peers * in_channels, peers * out_channels, kernel_size, stride=stride,
                         padding=padding, groups=peers * groups, bias=bias)
        self.peers = peers


class PeerBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d(num_features)` for each of `peers` peers: BN over `peers*num_features`
    channels (statistics are per channel, hence per peer). Input `[B, peers*C, H, W]`."""

    def __init__(self, num_features: int, peers: int = 1):
        super().__init__(peers * num_features)
        self.peers = peers


class PeerLinear(nn.Module):
    """`nn.Linear(in_features, out_features)` for each of `peers` peers.

    Input `[B, peers*in_features]` -> output `[B, peers*out_features]`. Parameters have the
    names and, for `peers=1`, the shapes of `nn.Linear`: `weight [peers*out, in]` (peer p owns
    rows `p*out : (p+1)*out`), `bias [peers*out]`. For `peers>1` the forward is one batched
    matmul over the `[peers, out, in]` view of the weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, peers: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.peers = in_features, out_features, peers
        self.weight = nn.Parameter(torch.empty(peers * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(peers * out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation, per peer (fan_in is in_features either way).
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1.0 / self.in_features ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.peers == 1:
            return F.linear(x, self.weight, self.bias)
        P, n_in, n_out = self.peers, self.in_features, self.out_features
        xs = x.reshape(x.shape[0], P, n_in).transpose(0, 1)            # [P, B, in]
        w = self.weight.view(P, n_out, n_in).transpose(1, 2)           # [P, in, out]
        if self.bias is None:
            y = torch.bmm(xs, w.to(xs.dtype))
        else:
            y = torch.baddbmm(self.bias.view(P, 1, n_out).to(xs.dtype), xs, w.to(xs.dtype))
        return y.transpose(0, 1).reshape(x.shape[0], P * n_out)          # [B, P*out]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, peers={self.peers}")


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is laid out NHWC (channel stride 1 with more than one channel)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()


def peer_pad_channels(x: torch.Tensor, peers: int, before: int, after: int) -> torch.Tensor:
    """Zero-pad the channels of every peer block: `[B, P*C, H, W]` -> `[B, P*(before+C+after), H, W]`.

    For `peers=1` this is `F.pad(x, (0, 0, 0, 0, before, after))`, the option-A shortcut of
    He et al. (2016). Keeps the memory format of `x`.
    """
    if peers == 1 and not is_channels_last(x):
        return F.pad(x, (0, 0, 0, 0, before, after))
    C = x.shape[1] // peers
    if is_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1).unflatten(3, (peers, C))           # [B, H, W, P, C]
        out = F.pad(nhwc, (before, after))
        return out.flatten(3, 4).permute(0, 3, 1, 2)                     # channels-last view
    out = F.pad(x.unflatten(1, (peers, C)), (0, 0, 0, 0, before, after))  # [B, P, C', H, W]
    return out.flatten(1, 2)


def peer_cat(tensors: list[torch.Tensor], peers: int) -> torch.Tensor:
    """Concatenate channels inside every peer block.

    `tensors[i]` is `[B, P*C_i, H, W]`; the result is `[B, P*sum(C_i), H, W]` whose peer-p block
    is `cat([t[:, p*C_i:(p+1)*C_i] for t in tensors])`. For `peers=1` this is `torch.cat(dim=1)`.
    Keeps channels-last when the first tensor is channels-last.
    """
    if peers == 1:
        return torch.cat(tensors, dim=1)
    if is_channels_last(tensors[0]):
        parts = [t.permute(0, 2, 3, 1).unflatten(3, (peers, t.shape[1] // peers)) for t in tensors]
        return torch.cat(parts, dim=4).flatten(3, 4).permute(0, 3, 1, 2)
    parts = [t.unflatten(1, (peers, t.shape[1] // peers)) for t in tensors]
    return torch.cat(parts, dim=2).flatten(1, 2)


def init_conv_bn(module: nn.Module) -> None:
    """He-normal (fan_out) convolutions, BN weight 1 / bias 0: the CIFAR-ResNet initialisation.

    The fan-out is that of ONE peer (`out_channels/peers * k*k`), so a grouped network is drawn
    from the same distribution as P single ones (`trainer.peers` goes further and builds the
    grouped network from P single ones, which makes it equal to `loop` for the same seed).
    """
    for m in module.modules():
        if getattr(m, "weight", None) is not None and m.weight.is_meta:
            continue                    # a skeleton (trainer.peers fills it); meta normal_ is slow
        if isinstance(m, nn.Conv2d):
            peers = getattr(m, "peers", 1)
            fan_out = m.out_channels // peers * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
