"""What `cnm train` shows while it runs: a rich progress bar per epoch and a summary table.

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


def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def epoch_line(row: dict, epochs: int) -> str:
    """The one-line log of an epoch (the --quiet output)."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4g}", f"loss {row['loss']:.4f}",
             f"ce {row['ce']:.4f}", f"kd {row['kd']:.4f}", f"fml {row['fml']:.4f}",
             "train " + "/".join(f"{a:.1f}" for a in row["train_acc"]),
             "test " + "/".join(f"{a:.2f}" for a in row["test_acc"]),
             f"ens {row['ensemble_acc']:.2f}"]
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
        # bars only on a terminal (a log file gets the plain lines)
        self.quiet = quiet or not (console.is_terminal if console is not None else sys.stdout.isatty())

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

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
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._steps = steps
        self._ips = images_per_step
        if not self.enabled or self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._live = LiveLoss(device)
        self._bar = RichProgress(TextColumn(f"epoch {epoch + 1}/{self.epochs}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[ips]} img/s"),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, ips="-", loss="-")

    def step(self, i: int, loss_sum: torch.Tensor, steps_done: torch.Tensor) -> None:
        """After step i (0-based) of the epoch; cheap, never synchronises the device."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self._last < self.refresh_s and i + 1 < self._steps:
            return
        self._last = now
        loss = self._live.poll(loss_sum, steps_done)
        ips = (i + 1) * self._ips / max(now - self._t0, 1e-9)
        self._bar.update(self._task, completed=i + 1, ips=f"{ips:.0f}", loss=_fmt(loss, 4))

    def end_epoch(self) -> None:
        """Remove the epoch's bar (also after an error)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def report(self, row: dict) -> None:
        """The epoch's log line (after evaluation)."""
        self.log(epoch_line(row, self.epochs))

    # ------------------------------------------------------------------ end of run
    def summary(self, rows: list[dict], best: dict | None, run_dir: str, archs=None) -> None:
        if not self.enabled or not rows:
            return
        last = rows[-1]
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
    from rich.table import Table

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
    return t
