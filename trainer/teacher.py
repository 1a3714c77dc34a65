"""Self-ensemble teacher: an exponential moving average (EMA) of every peer's weights.

The temporal mean teacher of Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), used per peer as
PCL's "peer mean teacher" (Wu & Gong, AAAI 2021). After every optimiser step t (0-based)

    decay_t = min(decay, (1 + t) / (10 + t))        (Mean Teacher's warm-up)
    θ̃ ← decay_t · θ̃ + (1 - decay_t) · θ

for every parameter, and BatchNorm's running mean/var with the same decay (`buffers="ema"`,
the default: the statistics belong to the averaged weights; `"copy"` takes the live peers').
`decay` itself comes from `resolve_decay`: `auto` is the decay whose horizon 1/(1 - decay) is
`HORIZON_EPOCHS` epochs of this run. `decay_t` is computed ON THE DEVICE from a step tensor and
applied with `torch._foreach_mul_` on a 0-d tensor weight: no host sync, no Python branch on
tensor values, so the update can be captured in a CUDA graph. `teacher_warning` reads the
metrics rows and says, once, when the teacher has stopped teaching. See docs/design.md#the-teacher.

The teacher's logits for peer k are those of EMA peer k on view k; `teacher_logits` averages
them into the ensemble target `t = mean_j z̃_j`. `peers_teacher` is the `--teacher peers`
alternative: the detached mean of the live peers' logits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.errors import CnmError
from trainer.config import parse_ema_decay
from trainer.peers import PeerSet

BUFFER_MODES = ("ema", "copy")
# `--ema-decay auto`: the teacher averages over the last HORIZON_EPOCHS epochs, 1/(1 - decay)
# steps. 2.56 epochs is the literature's 0.999 at batch 128 on 50k images (391 steps/epoch):
# 1000 steps = 2.56 epochs.
HORIZON_EPOCHS = 2.56
WARN_PATIENCE = 3      # epochs after the ramp-up the teacher may trail the best peer before a warning
WARN_MARGIN = 2.0      # points of test accuracy it must trail by (smaller gaps are test-set noise)


def resolve_decay(decay: str | float, steps_per_epoch: int) -> float:
    """`--ema-decay`: a number in [0, 1) as given, or "auto" -> `1 - 1/(HORIZON_EPOCHS * steps)`
    (a horizon of `HORIZON_EPOCHS` epochs, never below one step: decay >= 0)."""
    value = parse_ema_decay(decay)
    if value is not None:
        return value
    if steps_per_epoch < 1:
        raise CnmError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
    return 1.0 - 1.0 / max(1.0, HORIZON_EPOCHS * steps_per_epoch)


def ema_decay(step: torch.Tensor, decay: float) -> torch.Tensor:
    """`min(decay, (1 + step)/(10 + step))` as a float32 0-d tensor on `step`'s device (no host
    sync). Step 0 keeps 10% of the initialisation; after t steps its weight is
    prod_{s<t} (1+s)/(10+s) = 9!·t!/(t+9)! (1e-5 after 20 steps, 3e-10 after 100)."""
    s = step.to(torch.float32)
    return torch.clamp((1.0 + s) / (10.0 + s), max=decay)


class EMATeacher(nn.Module):
    """EMA copy of a `PeerSet` (loop or grouped), never trained by gradients.

    `.module`: the EMA PeerSet (requires_grad False, always in eval mode).
    `update(step)`: one EMA step towards the live peers, `step` a 0-d tensor on the peers'
    device (the number of optimiser steps taken before this one: 0 for the first update).
    `forward(views [P, B, 3, H, W]) -> logits [P, B, K]` under no_grad, eval mode.
    `state_dict()/load_state_dict()`: nn.Module's, i.e. the EMA PeerSet's own layout;
    `peer_state_dicts()/load_peer_state_dicts()` give the mode-independent per-peer form.
    """

    default_buffers = "ema"    # the BatchNorm-statistics mode when none is given (bench.ablation varies it)

    def __init__(self, peerset: PeerSet, decay: float = 0.999, buffers: str | None = None):
        super().__init__()
        buffers = self.default_buffers if buffers is None else buffers
        if buffers not in BUFFER_MODES:
            raise CnmError(f"unknown EMA buffer mode {buffers!r}; choose one of: {', '.join(BUFFER_MODES)}")
        self.decay = decay
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
    def decay(self) -> float:
        """The per-step decay (a Python float: a constant of a captured graph; set it before the
        first update)."""
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise CnmError(f"EMA decay must be in [0, 1), got {value}")
        self._decay = float(value)

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
        """One EMA step with `decay_t = min(decay, (1+step)/(10+step))`, all on the device."""
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


def teacher_warning(rows: list[dict], rampup_epochs: float, patience: int = WARN_PATIENCE,
                    margin: float = WARN_MARGIN) -> str | None:
    """The warning to print after the last of `rows` (metrics.jsonl rows), or None.

    It fires once per run: at the first epoch that ends `patience` consecutive epochs, all
    after the ramp-up (`epoch > rampup_epochs`), in which `teacher_ensemble_acc` was more than
    `margin` points below the best peer's `test_acc`. Stateless (a resumed run, whose rows are
    reloaded, does not repeat it); rows without a teacher never warn."""
    streak, fired_at = 0, None
    for i, r in enumerate(rows):
        t = r.get("teacher_ensemble_acc")
        if t is None or r["epoch"] <= rampup_epochs or t >= max(r["test_acc"]) - margin:
            streak = 0
            continue
        streak += 1
        if streak == patience and fired_at is None:
            fired_at = i
    if fired_at != len(rows) - 1:
        return None
    r = rows[-1]
    return (f"the EMA teacher ensemble ({r['teacher_ensemble_acc']:.2f}%) has been below the best peer "
            f"({max(r['test_acc']):.2f}%) by more than {margin:g} points for {patience} epochs after the "
            f"ramp-up: it pulls the peers down; try a shorter teacher horizon (--ema-decay, 'auto' = "
            f"{HORIZON_EPOCHS} epochs) or --teacher peers")


__all__ = ["BUFFER_MODES", "HORIZON_EPOCHS", "WARN_MARGIN", "WARN_PATIENCE", "EMATeacher", "ema_decay", "peers_teacher",
           "resolve_decay", "teacher_logits", "teacher_warning"]
