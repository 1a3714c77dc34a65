"""What `cnm train` shows while it runs: a rich progress bar per epoch and a summary table.

Beside the epoch bar (and at the end of every --quiet epoch line), the whole run: epochs done
and the time left (`RunClock`: from the measured time per epoch, or per step during the first
one). On a CPU, when that estimate exceeds an hour, one line says so with the flags that
shorten a run (docs/cli.md#cnm-train).

The bar shows images/s and the running mean loss without synchronising the device: every
`refresh_s` seconds the loss accumulator is copied to pinned host memory with a non-blocking
copy and a CUDA event is recorded; the value is displayed once the event has completed
(`event.query()`, which never waits). With `--quiet` (or when stdout is not a terminal) each epoch
is one plain log line instead. Only the main process (rank 0) prints.
"""

from __future__ import annotations

import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

CPU_WARN_S = 3600.0    # a CPU run whose estimate exceeds this is told how to shorten it
WARN_AFTER_S = 10.0    # ... once this much of its first epoch has run (or at its end)


def _now() -> float:
    """The clock of the estimates (seconds; tests put a fake clock here)."""
    return time.perf_counter()


def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def duration(s: float) -> str:
    """A duration for people: 45s, 12m05s, 9h41m, 3d04h."""
    s = max(round(s), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class RunClock:
    """The whole run's time left, from what this process measured.

    After k >= 1 finished epochs: time per epoch = (time since the first epoch started) / k
    (training, evaluation and saving). Before that, during the first epoch: time per step so
    far x steps per epoch (no evaluation yet), counted from the end of the first step once a
    second has finished (`mark_first_step`: the first step also pays for one-time set-up, e.g.
    allocator warm-up and kernel compilation, which would inflate the estimate by its whole
    cost per step). Left = the current epoch's remaining fraction plus every epoch after it."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.t_first: float | None = None   # when this process's first epoch started
        self.t_epoch = 0.0                  # when the current epoch started
        self.epoch = 0                      # the current epoch (0-based)
        self.steps = 1                      # its steps
        self.finished = 0                   # epochs finished by this process
        self.t_finished = 0.0               # when the last of them finished
        self.done = 0                       # epochs of the run finished (also before a resume)
        self.t_step1: float | None = None   # when this process's first step finished

    def start_epoch(self, epoch: int, steps: int, now: float) -> None:
        if self.t_first is None:
            self.t_first = now
        self.epoch, self.steps, self.t_epoch, self.done = epoch, max(steps, 1), now, epoch

    def end_epoch(self, now: float) -> None:
        """After the epoch's evaluation and save."""
        self.finished += 1
        self.t_finished = now
        self.done = self.epoch + 1

    def mark_first_step(self, now: float) -> None:
        """The first step of this process's first epoch has finished (later calls: no-op)."""
        if self.t_step1 is None and not self.finished:
            self.t_step1 = now

    def per_epoch(self, steps_done: int, now: float) -> float | None:
        """Seconds per epoch (None before the first step has finished)."""
        if self.finished:
            return (self.t_finished - self.t_first) / self.finished
        if steps_done < 1:
            return None
        if self.t_step1 is not None:
            if steps_done < 2:
                return None                  # only the set-up-laden first step so far
            return (now - self.t_step1) / (steps_done - 1) * self.steps
        return (now - self.t_epoch) / steps_done * self.steps

    def left(self, steps_done: int, now: float) -> float | None:
        """Seconds left in the run after `steps_done` steps of the current epoch (None: no
        measurement yet). Between epochs (`steps_done` = the epoch's steps) the current epoch
        counts as done."""
        per = self.per_epoch(steps_done, now)
        if per is None:
            return None
        in_epoch = per * (1 - min(steps_done, self.steps) / self.steps)
        return in_epoch + per * (self.epochs - self.epoch - 1)

    def text(self, steps_done: int, now: float) -> str:
        """`run 3/300 done, 9h41m left` (epochs finished / total)."""
        left = self.left(steps_done, now)
        return f"run {self.done}/{self.epochs} done, " + ("measuring" if left is None else f"{duration(left)} left")


def epoch_line(row: dict, epochs: int) -> str:
    """The one-line log of an epoch (the --quiet output); an epoch not evaluated (--eval-every)
    shows `test -`."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4g}", f"loss {row['loss']:.4f}",
             f"ce {row['ce']:.4f}", f"kd {row['kd']:.4f}", f"fml {row['fml']:.4f}",
             "train " + "/".join(f"{a:.1f}" for a in row["train_acc"])]
    if row.get("test_acc") is None:
        parts.append("test -")
    else:
        parts += ["test " + "/".join(f"{a:.2f}" for a in row["test_acc"]), f"ens {row['ensemble_acc']:.2f}"]
    if row.get("teacher_ensemble_acc") is not None:
        parts.append(f"teacher-ens {row['teacher_ensemble_acc']:.2f}")
    parts += [f"{row['images_per_s']:.0f} img/s", f"{row['epoch_s']:.1f}s"]
    return "  ".join(parts)


class LiveLoss:
    """Non-blocking read-back of a device accumulator pair (loss sum, step count)."""

    def __init__(self, device: torch.device):
        self.device = device
        cuda = device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.float32, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.pending = False
        self.value: float | None = None

    def poll(self, loss_sum: torch.Tensor, steps: torch.Tensor) -> float | None:
        """Latest completed value (mean loss per step), and schedule the next copy."""
        if self.event is None:  # CPU: the copy is immediate and costs no device sync
            self.host.copy_(torch.stack([loss_sum.detach(), steps.detach()]))
            s, n = self.host.tolist()
            self.value = s / n if n else None
            return self.value
        if self.pending and self.event.query():
            s, n = self.host.tolist()
            self.value = s / n if n else None
            self.pending = False
        if not self.pending:
            self.host.copy_(torch.stack([loss_sum.detach(), steps.detach()]), non_blocking=True)
            self.event.record()
            self.pending = True
        return self.value


class Progress:
    """Per-epoch bar (rich) or plain lines (quiet); summary table at the end."""

    def __init__(self, *, epochs: int, quiet: bool, enabled: bool = True, refresh_s: float = 0.5,
                 console=None):
        self.epochs = epochs
        self.enabled = enabled
        self.refresh_s = refresh_s
        self._bar = None
        self._task = None
        self._live: LiveLoss | None = None
        self._console = console
        self.clock = RunClock(epochs)
        self._cpu = False                  # the run is on a CPU (the long-run note applies)
        self.warned = False                # the long-run note was given
        # bars only on a terminal (a log file gets the plain lines)
        self.quiet = quiet or not (console.is_terminal if console is not None else sys.stdout.isatty())

    @property
    def console(self):
        if self._console is None:
            self._console = Console()
        return self._console

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.quiet:
            print(msg, flush=True)
        else:
            self.console.print(msg, highlight=False)

    # ------------------------------------------------------------------ one epoch
    def start_epoch(self, epoch: int, steps: int, images_per_step: int, device: torch.device) -> None:
        self._t0 = _now()
        self.clock.start_epoch(epoch, steps, self._t0)
        self._cpu = torch.device(device).type == "cpu"
        self._last = 0.0
        self._steps = steps
        self._ips = images_per_step
        if not self.enabled or self.quiet:
            return
        self._live = LiveLoss(device)
        self._bar = RichProgress(TextColumn(f"epoch {epoch + 1}/{self.epochs}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[ips]} img/s"),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                 TextColumn("| {task.fields[run]}"),
                                 console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, ips="-", loss="-",
                                        run=self.clock.text(0, self._t0))

    def step(self, i: int, loss_sum: torch.Tensor, steps_done: torch.Tensor) -> None:
        """After step i (0-based) of the epoch; cheap, never synchronises the device."""
        if not self.enabled or (self._bar is None and (self.warned or not self._cpu)):
            return
        now = _now()
        if i == 0:
            self.clock.mark_first_step(now)
        if not self.warned and self._cpu and now - self._t0 >= WARN_AFTER_S:
            self._note_long_run(i + 1, now)
        if self._bar is None:
            return
        if now - self._last < self.refresh_s and i + 1 < self._steps:
            return
        self._last = now
        loss = self._live.poll(loss_sum, steps_done)
        ips = (i + 1) * self._ips / max(now - self._t0, 1e-9)
        self._bar.update(self._task, completed=i + 1, ips=f"{ips:.0f}", loss=_fmt(loss, 4),
                         run=self.clock.text(i + 1, now))

    def _note_long_run(self, steps_done: int, now: float) -> None:
        """The one note of a CPU run estimated to need more than CPU_WARN_S."""
        left = self.clock.left(steps_done, now)
        if left is None or left <= CPU_WARN_S:
            return
        self.warned = True
        per = self.clock.per_epoch(steps_done, now)
        self.log(f"note: on the CPU this run needs about {duration(left)} more "
                 f"({self.epochs - self.clock.done} epochs left at about {duration(per)} each); "
                 f"to shorten it pass fewer --epochs, --limit-train N (fewer images per epoch) or a "
                 f"smaller --arch (e.g. resnet20)")

    def end_epoch(self) -> None:
        """Remove the epoch's bar (also after an error)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def report(self, row: dict) -> None:
        """The epoch's log line with the run's time left (after evaluation and saving)."""
        now = _now()
        self.clock.end_epoch(now)
        if self.enabled and self._cpu and not self.warned:
            self._note_long_run(self.clock.steps, now)
        self.log(epoch_line(row, self.epochs) + "  " + self.clock.text(self.clock.steps, now))

    # ------------------------------------------------------------------ end of run
    def summary(self, rows: list[dict], best: dict | None, run_dir: str, archs=None) -> None:
        if not self.enabled or not rows:
            return
        # the last evaluated epoch (the run's last epoch always is, unless --epochs was lowered)
        last = next((r for r in reversed(rows) if r.get("ensemble_acc") is not None), None)
        if last is None:
            self.log(f"done: {run_dir}  (no evaluated epoch)")
            return
        if self.quiet:
            self.log(f"done: {run_dir}  final ensemble {last['ensemble_acc']:.2f}%"
                     + (f"  teacher ensemble {last['teacher_ensemble_acc']:.2f}%"
                        if last.get("teacher_ensemble_acc") is not None else "")
                     + (f"  best ensemble {best['ensemble_acc']:.2f}% (epoch {best['epoch']})" if best else ""))
            return
        self.console.print(accuracy_table({**last, "archs": archs}, title=f"{run_dir} — epoch {last['epoch']}"))
        if best:
            self.console.print(f"best ensemble {best['ensemble_acc']:.2f}% at epoch {best['epoch']} "
                               f"(best.pt); total train time {sum(r['epoch_s'] for r in rows):.1f}s",
                               highlight=False)


def accuracy_table(acc: dict, title: str = ""):
    """A rich Table of per-peer / ensemble / teacher accuracies (as in metrics rows and eval.json)."""
    t = Table(title=title)
    t.add_column("model")
    t.add_column("test acc %", justify="right")
    has_teacher = acc.get("teacher_acc") is not None
    if has_teacher:
        t.add_column("EMA teacher acc %", justify="right")
    archs = acc.get("archs")
    for k, a in enumerate(acc["test_acc"]):
        cells = [f"peer {k}" + (f" ({archs[k]})" if archs else ""), f"{a:.2f}"]
        if has_teacher:
            cells.append(f"{acc['teacher_acc'][k]:.2f}")
        t.add_row(*cells)
    cells = ["ensemble (mean softmax)", f"{acc['ensemble_acc']:.2f}"]
    if has_teacher:
        cells.append(f"{acc['teacher_ensemble_acc']:.2f}")
    t.add_row(*cells, style="bold")
    if acc.get("disagreement") is not None:
        t.caption = f"two peers disagree on {acc['disagreement']:.2f}% of the test images (mean over pairs)"
    return t
