"""The step's gradient averaging over all ranks (DDP's): `GradAllReduce`, and the flat-buffer
helpers the communicator's broadcasts share. Why the collective sits between two CUDA graphs:
docs/distributed.md#gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # comm.py imports this module (Comm.grad_all_reduce)
    from trainer.distributed.comm import Comm


class GradAllReduce:
    """Average the gradients of `params` over all ranks.

    All gradients of one dtype and device go into ONE flat 1-d buffer (`self.flats`), which is
    all-reduced (SUM) and scaled by 1/world; a missing gradient counts as zeros (as the
    optimiser treats it). In three parts so that the pack and unpack copies can sit inside
    CUDA graphs while the collective stays outside (trainer/step.py):

        pack(grads)    gradients -> flat buffers        (device copies; capturable)
        reduce()       all-reduce the flat buffers       (the collective; eager)
        unpack(grads)  flat / world -> gradients         (device copies; capturable)

    `__call__()` does all three on the parameters' current `.grad` (the eager step). An
    all-reduce returns the same bits on every rank, so the replicas stay bitwise identical.
    """

    def __init__(self, params: Iterable[nn.Parameter], comm: Comm):
        self.params = [p for p in params if p.requires_grad]
        self.comm = comm
        self.scale = 1.0 / comm.world
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            keys.setdefault((p.device, p.dtype), []).append(i)
        self.groups = list(keys.values())                      # parameter indices per flat buffer
        self.flats = [torch.zeros(sum(self.params[i].numel() for i in g), dtype=self.params[g[0]].dtype,
                                  device=self.params[g[0]].device) for g in self.groups]

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]

    @torch.no_grad()
    def pack(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Copy the gradients (default: the parameters' `.grad`) into the flat buffers: one
        `torch.cat` per buffer, each gradient in its memory order (a view, no copy, for
        contiguous and channels-last tensors; every rank has the same layouts)."""
        grads = self.grads() if grads is None else grads
        for flat, group in zip(self.flats, self.groups):
            parts = []
            for i in group:
                g = grads[i]
                parts.append(torch.zeros(self.params[i].numel(), dtype=flat.dtype, device=flat.device)
                             if g is None else _memory_order_view(g))
            torch.cat(parts, out=flat)

    def reduce(self) -> None:
        """All-reduce (SUM) the flat buffers. On CUDA the collective is queued on the current
        stream and the host does not wait for it (no host sync inside an epoch)."""
        for flat in self.flats:
            self.comm.all_reduce_sum(flat, block=False)

    @torch.no_grad()
    def unpack(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Scale the flat buffers by 1/world and copy them back into the gradients (one
        `_foreach_copy_` per buffer); a parameter whose `.grad` is None gets a new tensor."""
        live = grads is None
        grads = self.grads() if grads is None else grads
        for flat, group in zip(self.flats, self.groups):
            flat.mul_(self.scale)
            pieces = flat.split([self.params[i].numel() for i in group])
            dst, src = [], []
            for i, piece in zip(group, pieces):
                g = grads[i]
                if g is None:
                    if live:
                        self.params[i].grad = piece.view(self.params[i].shape).clone()
                    continue
                if _is_dense(g):                       # memory order, as packed
                    dst.append(_memory_order_view(g))
                    src.append(piece)
                else:                                  # an odd layout: logical order, as packed
                    g.copy_(piece.view(g.shape))
            if dst:
                torch._foreach_copy_(dst, src)

    def __call__(self) -> None:
        self.pack()
        self.reduce()
        self.unpack()


def flat_groups(tensors: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(flat 1-d buffer, tensors) per (device, dtype): the tensors' values, concatenated."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        yield torch.cat([t.detach().reshape(-1) for t in group]), group


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` into `tensors` (logical element order; any strides)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _memory_order_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of `t` as a 1-d tensor in memory order: a view for contiguous and
    channels-last tensors, a (logical-order) copy otherwise."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return t.reshape(-1)
