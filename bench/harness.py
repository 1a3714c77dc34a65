"""The timing harness shared by `cnm bench` and `cnm bench train`.

`time_repeats` runs a workload's `step()` for a warm-up (not timed), then `repeats` timed
regions of `per_repeat` steps each. The device is synchronised before the first region and at
the end of every region, so asynchronous CUDA work launched inside a region is paid for inside
it. The clock and the synchronisation are arguments, so tests drive the harness with fake
timings.

`PeakMemory` records, around a block, the peak host memory (resident set of this process plus
its worker processes, sampled by a background thread with psutil; without psutil, the
process-lifetime `ru_maxrss` of self and children) and the peak device memory (the torch CUDA
caching allocator's `max_memory_allocated`, plus the growth of the device-wide used memory
from `cudaMemGetInfo` over the block, which also sees DALI's and FFCV's own allocations and
leaves out other processes' memory that was already there).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Clock = Callable[[], float]


@dataclass
class Timings:
    """Raw outcome of `time_repeats`: per repeat, the units of work done and the seconds taken."""

    items: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for all queued work on `device` (no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_repeats(step: Callable[[], int], *, warmup: int, per_repeat: int, repeats: int,
                 sync: Callable[[], None], clock: Clock = time.perf_counter) -> Timings:
    """Time `repeats` regions of `per_repeat` calls of `step` after `warmup` untimed calls.

    step: does one unit (a batch, a train step) and returns how many items it delivered
          (images of the batch; the P views of a sample count as one image).
    sync: waits for the device; called after the warm-up and at the end of every region, so every
          region starts and ends with an idle device.
    clock: seconds, monotonic (time.perf_counter); injected by tests.
    """
    if per_repeat < 1 or repeats < 1 or warmup < 0:
        raise ValueError("time_repeats: per_repeat and repeats must be >= 1, warmup >= 0")
    out = Timings()
    t0 = clock()
    for _ in range(warmup):
        step()
    sync()
    out.warmup_seconds = clock() - t0
    for _ in range(repeats):
        start = clock()
        n = 0
        for _ in range(per_repeat):
            n += int(step())
        sync()
        out.seconds.append(clock() - start)
        out.items.append(n)
    return out


# ----------------------------------------------------------------------------- memory


def _psutil():
    try:
        import psutil  # optional: not a core dependency
    except Exception:
        return None
    return psutil


def host_rss_bytes() -> int | None:
    """Resident set size of this process plus all its descendants (psutil), or None without it.

    Shared pages (e.g. a dataset mapped by forked loader workers) are counted once per process,
    so this over-states the physical footprint of multi-process loaders; it is what `top` shows.
    """
    ps = _psutil()
    if ps is None:
        return None
    try:
        me = ps.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                pass
        return total
    except Exception:
        return None


def lifetime_maxrss_bytes() -> int:
    """Peak RSS over the process lifetime (self) plus the largest reaped child (getrusage)."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) * unit


class PeakMemory:
    """Context manager measuring peak host and device memory inside its block.

    After the block: `peak_host_mb` (MiB), `host_method` ("psutil rss, self+children, sampled"
    or "ru_maxrss, process lifetime"), `peak_device_mb` (torch allocator peak, MiB; None on CPU),
    `peak_device_growth_mb` (peak growth of the device-wide used memory (cudaMemGetInfo) over its
    value on entry, MiB; None on CPU).
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.05):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_host_mb: float | None = None
        self.host_method = ""
        self.peak_device_mb: float | None = None
        self.peak_device_growth_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host_peak = 0
        self._dev_used_peak = 0
        self._dev_used_start: int | None = None

    def _sample(self) -> None:
        rss = host_rss_bytes()
        if rss is not None:
            self._host_peak = max(self._host_peak, rss)
        if self.device.type == "cuda":
            try:
                free, total = torch.cuda.mem_get_info(self.device)
                self._dev_used_peak = max(self._dev_used_peak, total - free)
            except Exception:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            self._dev_used_start = total - free
        self._sample()
        if _psutil() is not None or self.device.type == "cuda":
            self._thread = threading.Thread(target=self._run, name="cnm-bench-mem", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if _psutil() is not None and self._host_peak:
            self.peak_host_mb = self._host_peak / 2**20
            self.host_method = "psutil rss of self+children, sampled every %g s" % self.interval_s
        else:
            self.peak_host_mb = lifetime_maxrss_bytes() / 2**20
            self.host_method = "ru_maxrss of self+children, process lifetime"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_device_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            start = self._dev_used_start or 0
            self.peak_device_growth_mb = max(self._dev_used_peak - start, 0) / 2**20


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask), falling back to os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
