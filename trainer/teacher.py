"""Self-ensemble teacher: an exponential moving average (EMA) of every peer's weights.

The temporal mean teacher of Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), used per peer as
PCL's "peer mean teacher" (Wu & Gong, AAAI 2021). After every optimiser step

    decay_t = min(decay, 1 - 1/(step + 1))          (warm-up: a plain average early on)
    θ̃ ← decay_t · θ̃ + (1 - decay_t) · θ

for every parameter. `decay_t` is computed ON THE DEVICE from a step tensor and applied with
`torch._foreach_mul_` on a 0-d tensor weight: no `.item()`, no host sync, no Python branch on tensor values, so the
update can be captured in a CUDA graph. BatchNorm buffers (running mean/var,
`num_batches_tracked`) are COPIED from the live peers by default (`buffers="copy"`): the common
choice for EMA teachers evaluated in eval mode; `buffers="ema"` averages the float buffers with
the same decay instead (the counter is always copied).

The teacher's logits for peer k are those of EMA peer k on view k; `teacher_logits` averages
them over peers into the ensemble target `t = mean_j z̃_j` (DESIGN.md). `peers_teacher` is the
`--teacher peers` alternative: the detached mean of the live peers' logits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.errors import CnmError
from trainer.peers import PeerSet

BUFFER_MODES = ("copy", "ema")


def ema_decay(step: torch.Tensor, decay: float) -> torch.Tensor:
    """`min(decay, 1 - 1/(step + 1))` as a float32 tensor on `step`'s device (no host sync)."""
    s = step.to(torch.float32)
    return torch.clamp(1.0 - 1.0 / (s + 1.0), max=decay)


class EMATeacher(nn.Module):
    """EMA copy of a `PeerSet` (loop or grouped), never trained by gradients.

    `.module`: the EMA PeerSet (requires_grad False, always in eval mode).
    `update(step)`: one EMA step towards the live peers, `step` a 0-d tensor on the peers'
    device (the number of optimiser steps taken before this one: 0 for the first update).
    `forward(views [P, B, 3, H, W]) -> logits [P, B, K]` under no_grad, eval mode.
    `state_dict()/load_state_dict()`: nn.Module's, i.e. the EMA PeerSet's own layout;
    `peer_state_dicts()/load_peer_state_dicts()` give the mode-independent per-peer form.
    """

    def __init__(self, peerset: PeerSet, decay: float = 0.999, buffers: str = "copy"):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise CnmError(f"EMA decay must be in [0, 1), got {decay}")
        if buffers not in BUFFER_MODES:
            raise CnmError(f"unknown EMA buffer mode {buffers!r}; choose one of: {', '.join(BUFFER_MODES)}")
        self.decay = float(decay)
        self.buffer_mode = buffers
        self.module = copy.deepcopy(peerset)
        for p in self.module.parameters():
            p.grad = None
            p.requires_grad_(False)
        self.module.eval()
        # The live peers are held outside the module tree: not in our state_dict, not moved by
        # our .to(); the trainer owns them.
        self.__dict__["_live"] = peerset

    @property
    def live(self) -> PeerSet:
        return self.__dict__["_live"]

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher always runs in eval mode (BN uses its running statistics)."""
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, step: torch.Tensor) -> None:
        """One EMA step with `decay_t = min(decay, 1 - 1/(step+1))`, all on the device."""
        ema_params = list(self.module.parameters())
        live_params = list(self.live.parameters())
        if len(ema_params) != len(live_params):
            raise CnmError("EMA teacher and live peers have different parameter lists")
        if not torch.is_tensor(step):
            step = torch.tensor(step)
        weight = 1.0 - ema_decay(step.to(ema_params[0].device), self.decay)   # 0-d float32
        self._lerp(ema_params, live_params, weight)
        ema_bufs = list(self.module.buffers())
        live_bufs = list(self.live.buffers())
        if self.buffer_mode == "ema":
            floats = [(e, b) for e, b in zip(ema_bufs, live_bufs) if e.is_floating_point()]
            if floats:
                self._lerp([e for e, _ in floats], [b for _, b in floats], weight)
            rest = [(e, b) for e, b in zip(ema_bufs, live_bufs) if not e.is_floating_point()]
        else:
            rest = list(zip(ema_bufs, live_bufs))
        if rest:
            torch._foreach_copy_([e for e, _ in rest], [b for _, b in rest])

    @staticmethod
    def _lerp(ema: list[torch.Tensor], live: list[torch.Tensor], weight: torch.Tensor) -> None:
        """ema += weight * (live - ema), `weight` a 0-d device tensor. Not `_foreach_lerp_`: torch
        (2.13 included) has no Tensor-weight overload of it, so a 0-d weight binds to `Scalar`
        and calls `.item()`, a host sync that breaks CUDA-graph capture. `_foreach_mul_` has one."""
        diff = torch._foreach_sub(live, ema)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(ema, diff)

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """`views [P, B, 3, H, W]` -> EMA peer k's logits on view k, `[P, B, K]` (no grad)."""
        self.module.eval()
        logits, _ = self.module(views)
        return logits

    @torch.no_grad()
    def forward_shared(self, images: torch.Tensor) -> torch.Tensor:
        """Every EMA peer on the same images `[B, 3, H, W]` -> `[P, B, K]` (evaluation)."""
        self.module.eval()
        logits, _ = self.module.forward_shared(images)
        return logits

    def peer_state_dicts(self):
        return self.module.peer_state_dicts()

    def load_peer_state_dicts(self, states) -> None:
        self.module.load_peer_state_dicts(states)


def teacher_logits(logits: torch.Tensor) -> torch.Tensor:
    """Ensemble target from per-peer logits: `[P, B, K]` -> detached mean over peers `[B, K]` float32."""
    return logits.detach().float().mean(dim=0)


def peers_teacher(live_logits: torch.Tensor) -> torch.Tensor:
    """`--teacher peers`: the detached mean of the live peers' logits, `[P, B, K]` -> `[B, K]`."""
    return teacher_logits(live_logits)


__all__ = ["BUFFER_MODES", "EMATeacher", "ema_decay", "peers_teacher", "teacher_logits"]
