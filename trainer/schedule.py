"""Learning-rate schedules of the CIFAR online-distillation recipe (host-side floats).

- `step`:   lr0, x0.1 at 50% and x0.01 at 75% of the epochs (150 and 225 of 300: the schedule of
            ONE, OKDDip and PCL), changing at epoch boundaries.
- `cosine`: lr0 * (1 + cos(pi * t)) / 2 with t the fraction of training done, evaluated every
            step (SGDR without restarts, Loshchilov & Hutter 2017).

The loop writes the value into a device tensor with `fill_` before each step, so the CUDA graph
reads the current lr without being re-captured and without a host sync.
"""

from __future__ import annotations

import math


def lr_at(schedule: str, lr0: float, epochs: int, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for step `step` (0-based) of epoch `epoch` (0-based)."""
    if schedule == "step":
        drops = sum(epoch >= m for m in milestones(epochs))
        return lr0 / 10 ** drops
    if schedule == "cosine":
        t = (epoch + step / max(steps_per_epoch, 1)) / epochs
        return lr0 * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")


def milestones(epochs: int) -> list[int]:
    """Epochs (0-based) at which the step schedule divides the lr by 10 (ceil: a short run
    starts at lr0; 300 epochs -> 150, 225)."""
    return [math.ceil(m * epochs) for m in (0.5, 0.75)]
