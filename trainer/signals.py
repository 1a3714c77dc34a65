"""SIGTERM and Ctrl-C as a clean stop: a flag checked at step boundaries, one message, 143/130.

    with graceful_stop(lambda: resume_hint(run, epochs_done, epochs)) as stop:
        ...                          # every step boundary:
        stop.check()                 # raises Interrupted once SIGTERM/SIGINT arrived

The first SIGTERM or SIGINT only sets `stop.signum` (a Python attribute: checking it costs no
device sync), so the current step finishes and nothing is written half-way; a second one
raises `Interrupted` at once (the user insists). `Interrupted` unwinds through the caller's
`finally` blocks (stop the progress bar, close the loader); leaving the block then prints
"stopped by SIGTERM" and the `describe()` line to stderr and exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT). Forked loader workers that inherit the handler
ignore the signals. See docs/cli.md#the-run-directory.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal reached a safe point (BaseException: `except Exception` does not eat it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """The stop flag: `signum` is the first stop signal received, or None."""

    def __init__(self, report: bool = True):
        self.signum: int | None = None
        self.report = report
        self.owner = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise `Interrupted` if a stop signal arrived (call it between steps)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.owner:  # a forked loader worker: the main process decides
            return
        if self.signum is not None:   # the second signal: abandon the current work now
            raise Interrupted(self.signum)
        self.signum = signum
        if self.report:  # os.write: a print() could re-enter a print the signal interrupted
            os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of the current step "
                        f"(send it again to stop at once)\n".encode())


@contextlib.contextmanager
def graceful_stop(describe: Callable[[], str] | None = None, *, report: bool = True) -> Iterator[Stop]:
    """Route SIGTERM and SIGINT to a `Stop` flag for the duration of the block.

    On `Interrupted` leaving the block: print (when `report`; e.g. rank 0 only) "stopped by
    SIGNAME" and `describe()`, then `SystemExit(128 + signum)`. The previous handlers are
    restored on the way out. Outside the main thread (where Python cannot install handlers) the
    block runs with the flag never set.
    """
    stop = Stop(report)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, stop._handle)
    try:
        yield stop
    except (Interrupted, Exception) as e:
        if not isinstance(e, Interrupted) and stop.signum is None:
            raise
        # an error after a stop signal is taken as its consequence (e.g. the loader's workers,
        # which got the same SIGTERM from the scheduler, died): named, not a traceback
        signum = e.signum if isinstance(e, Interrupted) else stop.signum
        _restore(previous)
        if previous:  # the process exits now: a child's death (torch's SIGCHLD handler raises
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # for loader workers) is no error
        previous = {}
        if report:
            head = f"stopped by {signal.Signals(signum).name}"
            if not isinstance(e, Interrupted):
                head += f" (while stopping: {type(e).__name__}: {str(e).strip().splitlines()[0]})"
            lines = [head] + ([describe()] if describe is not None else [])
            sys.stdout.flush()
            print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        _restore(previous)


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def resume_hint(run_dir: str | os.PathLike, epoch_done: int, epochs: int) -> str:
    """Where an interrupted run stands and the exact command that continues it (one line)."""
    run = shlex.quote(str(run_dir))
    command = f"cnm train --out {run} --resume"
    if epoch_done >= epochs:
        return f"{run_dir}: all {epochs} epochs are done; to train longer: {command} --epochs N"
    if epoch_done <= 0:
        return (f"{run_dir}: stopped in epoch 1/{epochs}, before the first checkpoint; "
                f"to start it again with its settings: {command}")
    return (f"{run_dir}: stopped after epoch {epoch_done}/{epochs} (last.pt holds epoch "
            f"{epoch_done}); to continue: {command}")
