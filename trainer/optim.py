"""The optimiser of the step: `CapturableSGD`, and its momentum saved per peer.

`CapturableSGD` is SGD with momentum, dampening 0, Nesterov and L2 weight decay exactly as
`torch.optim.SGD` (checked against it in tests/trainer/test_step.py), written with
`torch._foreach_*` ops and a 0-d device-tensor lr. `torch.optim.SGD` cannot be used: its foreach
path turns a tensor lr into a host scalar (`alpha=-lr`, a sync and a value frozen at CUDA-graph
capture), and the fused path is CUDA-only and version-dependent. Momentum buffers start at zero,
which with dampening 0 is identical to torch's "first step copies the gradient".

`momentum_to_peer_dicts` / `load_momentum`: the buffers as P per-peer dicts shaped like the
peers' state dicts (the name mapping is the `PeerSet`'s), so a checkpoint does not depend on
--peer-exec (docs/design.md#the-train-step).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.errors import CnmError


class CapturableSGD:
    """SGD with momentum/Nesterov/L2 weight decay whose lr is a 0-d device tensor.

    Per parameter p with gradient g (torch.optim.SGD semantics, dampening 0):
        d = g + wd * p;  buf = momentum * buf + d;  d = d + momentum * buf (nesterov) else buf
        p -= lr * d
    No host sync, no data-dependent Python branches: safe inside a CUDA graph.
    """

    def __init__(self, params: Sequence[nn.Parameter], lr: torch.Tensor, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.bufs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.weight_decay:
            d = torch._foreach_add(grads, params, alpha=self.weight_decay)
        else:
            d = [g.clone() for g in grads]
        if self.momentum:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, d)
            if self.nesterov:
                torch._foreach_add_(d, self.bufs, alpha=self.momentum)
            else:
                d = self.bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, self.lr))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> list[torch.Tensor]:
        return list(self.bufs)


def momentum_to_peer_dicts(peerset, optimizer: CapturableSGD) -> list[OrderedDict]:
    """The momentum buffers as P per-peer dicts (param name -> CPU tensor), split like
    `peer_state_dicts`."""
    by_param = {id(p): b for p, b in zip(optimizer.params, optimizer.bufs)}
    return peerset.split_by_peer({n: by_param[id(p)].detach().cpu().clone()
                                  for n, p in peerset.named_parameters()})


def load_momentum(peerset, optimizer: CapturableSGD, states) -> None:
    """Inverse of `momentum_to_peer_dicts` (copies into the existing buffers in place)."""
    merged = peerset.merge_by_peer(states)
    by_param = {id(p): b for p, b in zip(optimizer.params, optimizer.bufs)}
    with torch.no_grad():
        for n, p in peerset.named_parameters():
            if n not in merged or merged[n].shape != p.shape:
                raise CnmError(f"checkpoint momentum does not fit parameter {n}")
            by_param[id(p)].copy_(merged[n])
