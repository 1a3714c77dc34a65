"""TensorBoard logging of a run (`--log tensorboard`, the optional `tensorboard` extra).

Two parts, so that nothing inside an epoch waits for the device:

- `StepLossBuffer`: the step writes its total loss and global step into preallocated device
  tensors (`record`: index_copy_ at a device counter, no host sync, CUDA-graph capturable);
  the loop reads the buffer once per epoch, or every K steps (`read`: the one host copy).
- `TensorBoardLog`: writes what was read as `train_step/loss` (mean over each block of
  `loss_every` global steps, at the block's last step), every metrics.jsonl row (`epoch`, x =
  epoch: per-peer and ensemble accuracies, every loss term, lr, ramp weight, images/s, times),
  and the resolved config as hparams (`hparams`).

metrics.jsonl stays the source of truth; the tags are listed in docs/cli.md#tensorboard.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline import backends

# metrics.jsonl key -> TensorBoard tag (lists get "_peer<k>" appended, k from 1)
EPOCH_TAGS = {
    "lr": "opt/lr", "ramp": "opt/ramp",
    "loss": "loss/total", "ce": "loss/ce", "kd": "loss/kd", "fml": "loss/fml",
    "train_acc": "train/acc", "test_acc": "test/acc", "ensemble_acc": "test/ensemble_acc",
    "teacher_acc": "test/teacher_acc", "teacher_ensemble_acc": "test/teacher_ensemble_acc",
    "disagreement": "test/disagreement",
    "images_per_s": "speed/images_per_s", "epoch_s": "time/epoch_s", "eval_s": "time/eval_s",
}
NOT_LOGGED = ("epoch", "global_step")     # the x axes
STEP_LOSS_TAG = "train_step/loss"
HPARAM_METRICS = ("test/ensemble_acc", "test/teacher_ensemble_acc")


class StepLossBuffer:
    """Per-step losses kept on the device until the loop reads them.

    loss: float32 [capacity], step: int64 [capacity] (global step of each entry), count: int64
    0-d (entries since the last read). Keeps the most recent `capacity` entries; size it to the
    read interval (steps per epoch when read once per epoch) and nothing is dropped.
    """

    def __init__(self, capacity: int, device: torch.device | str):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.loss = torch.zeros(self.capacity, dtype=torch.float32, device=device)
        self.step = torch.zeros(self.capacity, dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, global_step: torch.Tensor) -> None:
        """Store one step's total loss (0-d, any float dtype; the metrics row's `loss`) at its
        global step (0-d int64 tensor: steps done including this one, i.e. counted from 1).
        Device ops only: no host sync."""
        i = torch.remainder(self.count, self.capacity).view(1)
        self.loss.index_copy_(0, i, loss.detach().float().view(1))
        self.step.index_copy_(0, i, global_step.detach().view(1).to(torch.int64))
        self.count += 1

    def read(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(global steps int64 [n], losses float32 [n], dropped) recorded since the last read, in
        order; dropped: older entries overwritten because more than `capacity` were recorded.
        One host copy (a device sync); the buffer is empty afterwards."""
        count = int(self.count.cpu())
        steps, loss = self.step.cpu().numpy(), self.loss.cpu().numpy()
        self.count.zero_()
        n = min(count, self.capacity)
        order = (np.arange(count - n, count) % self.capacity) if n else np.zeros(0, dtype=np.int64)
        return steps[order].copy(), loss[order].copy(), count - n


def scalars(row: dict) -> dict[str, float]:
    """tag -> value of one metrics.jsonl row (None values, e.g. no teacher, are left out; keys
    without a tag of their own go under other/)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_LOGGED or value is None:
            continue
        tag = EPOCH_TAGS.get(key, f"other/{key}")
        if isinstance(value, (list, tuple)):
            out.update({f"{tag}_peer{k + 1}": float(v) for k, v in enumerate(value) if v is not None})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def hparam_values(config: dict, prefix: str = "") -> dict[str, float | str]:
    """A config dict as TensorBoard hparams: numbers and strings kept, booleans as "true" /
    "false" (TensorBoard would show them as 1/0), nested dicts flattened as `a.b`, everything
    else (lists, None) as its string."""
    out: dict[str, float | str] = {}
    for k, v in config.items():
        name = f"{prefix}{k.lstrip('_')}"
        if isinstance(v, dict):
            out.update(hparam_values(v, prefix=name + "."))
        elif isinstance(v, bool):
            out[name] = "true" if v else "false"
        elif isinstance(v, (int, float, str)):
            out[name] = v
        else:
            out[name] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return out


class TensorBoardLog:
    """Event files of one run in `logdir` (e.g. RUN/tensorboard). See the module docstring."""

    def __init__(self, logdir: str | Path, *, loss_every: int = 50):
        if loss_every < 1:
            raise ValueError(f"loss_every must be >= 1, got {loss_every}")
        backends.require("tensorboard", "--log tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.logdir = Path(logdir)
        self.loss_every = int(loss_every)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self._pending: list[tuple[int, float]] = []    # steps of a block not finished yet

    def hparams(self, config: dict) -> None:
        """The resolved config (RUN/config.json's dict) as the run's hparams."""
        from torch.utils.tensorboard.summary import hparams

        exp, ssi, sei = hparams(hparam_values(config), {tag: 0.0 for tag in HPARAM_METRICS})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def steps(self, steps: np.ndarray, losses: np.ndarray) -> None:
        """Per-step losses (from `StepLossBuffer.read`) as `train_step/loss`: the mean of each block
        of `loss_every` global steps ((j-1)N, jN], written at step jN once the block is complete
        (a block cut by a read-out is finished by the next one). Non-finite steps are left out."""
        for s, v in zip(steps.tolist(), losses.tolist()):
            if self._pending and (s - 1) // self.loss_every != (self._pending[-1][0] - 1) // self.loss_every:
                self._write_block()
            if math.isfinite(v):
                self._pending.append((s, v))
            if s % self.loss_every == 0:
                self._write_block()

    def _write_block(self) -> None:
        if self._pending:
            last = self._pending[-1][0]
            self.writer.add_scalar(STEP_LOSS_TAG, sum(v for _, v in self._pending) / len(self._pending),
                                   global_step=last)
        self._pending = []

    def epoch(self, row: dict, buffer: StepLossBuffer | None = None) -> int:
        """One metrics.jsonl row at x = row["epoch"]; with `buffer`, its per-step losses first
        (read out: the epoch's one extra host copy). Returns how many step losses the buffer had
        dropped (0 when its capacity covers the read interval). The loop's one line per epoch:
        `tb.epoch(row, loss_buffer)`."""
        dropped = 0
        if buffer is not None:
            steps, losses, dropped = buffer.read()
            self.steps(steps, losses)
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["epoch"]))
        self.writer.flush()
        return dropped

    def close(self) -> None:
        """Write an unfinished loss block and close the event file."""
        self._write_block()
        self.writer.close()


def for_run(run) -> TensorBoardLog:
    """`--log tensorboard` for a `trainer.run.Run`: the log in RUN/tensorboard (per-step loss
    blocks of `--log-every` steps), and a `StepLossBuffer` of one epoch's steps installed as the
    step's `loss_buffer` (read once per epoch by `TensorBoardLog.epoch`). A missing tensorboard
    package fails here, before anything is written."""
    tb = TensorBoardLog(run.dir / "tensorboard", loss_every=run.cfg.log_every)
    run.step.loss_buffer = StepLossBuffer(len(run.loader), run.step.device)
    return tb
