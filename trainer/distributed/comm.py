"""The communicator: the only way the trainer talks to the other processes.

`Comm` is the single-process null object (rank 0 of 1, every collective the identity), so a
one-process run goes through the same code. `ProcessGroupComm` runs over a `torch.distributed`
group. Every collective except the step's gradient all-reduce on CUDA is started with
`async_op=True` and waited for on the host at most `timeout_s` (`--dist-timeout`): a peer that
died or hangs becomes a one-line `CnmError` naming this rank, on gloo and on NCCL alike (NCCL
collectives never raise by themselves). See docs/distributed.md#failures.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import CnmError
from trainer.distributed.fault import FaultInjector
from trainer.distributed.grads import GradAllReduce, flat_groups, unflatten_into

DEFAULT_TIMEOUT_S = 600.0
POLL_S = (1e-4, 1e-2)   # the bounded wait polls `work.is_completed()` with this back-off (s)


class Comm:
    """The single-process communicator: rank 0 of 1, every collective is the identity."""

    rank = 0
    world = 1
    local_rank = 0
    backend: str | None = None

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = float(timeout_s)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        """The training device of this process: `cpu`, or `cuda:LOCAL_RANK`."""
        if device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(device_type)

    def all_reduce_sum(self, t: torch.Tensor, *, block: bool = True) -> torch.Tensor:
        """Sum of `t` over all ranks, in place; returns `t`. `block=False` (the step's gradient
        all-reduce): a CUDA tensor's collective is queued on the current stream and the host
        does not wait for it; CPU tensors are always waited for."""
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum of `t` over all ranks, in place; returns `t`."""
        return t

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        return obj

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` (in place) with rank 0's values."""

    def sync_module(self, module: nn.Module | None) -> None:
        """Rank 0's parameters and buffers of `module` on every rank (in place)."""

    def sync_buffers(self, module: nn.Module | None) -> None:
        """Rank 0's buffers (BatchNorm running statistics) of `module` on every rank."""

    def barrier(self) -> None:
        pass

    def agree(self, error: str | None, what: str = "set-up") -> None:
        """Raise on every rank if any rank passes an error message (a CnmError naming the ranks)."""
        if error is not None:
            raise CnmError(error)

    def everywhere(self, fn: Callable[[], object], what: str = "set-up"):
        """Run `fn` on every rank; a CnmError on any rank is raised on all of them (`agree`)."""
        result, error = None, None
        try:
            result = fn()
        except CnmError as e:
            error = str(e)
        self.agree(error, what)
        return result

    def on_main(self, fn: Callable[[], object], what: str = "set-up"):
        """Run `fn` on rank 0 only; every rank gets its (picklable, small) result, or raises
        rank 0's CnmError."""
        return fn()

    def grad_all_reduce(self, params: Iterable[nn.Parameter]) -> GradAllReduce | None:
        """The gradient averager of the step (None for one process: nothing to average)."""
        return None

    def fault_injector(self) -> FaultInjector | None:
        return FaultInjector.from_env(self.rank)

    def close(self) -> None:
        pass


class ProcessGroupComm(Comm):
    """A communicator over the default `torch.distributed` process group, or over `group`.

    `backends`: ("gloo",) or ("gloo", "nccl") (CPU / CUDA tensors). Object collectives and the
    barrier use CPU tensors (gloo). A failure or a wait past `timeout_s` is a one-line CnmError.
    """

    def __init__(self, rank: int, world: int, local_rank: int, backends: Sequence[str] = ("gloo",),
                 timeout_s: float = DEFAULT_TIMEOUT_S, group=None):
        super().__init__(timeout_s)
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backends = tuple(backends)
        self.group = group                # None: the default (world) group
        self._device: torch.device | None = None

    @property
    def backend(self) -> str:
        """The back-end of the training tensors: nccl on CUDA, gloo on the CPU."""
        if self._device is None:
            return "+".join(self.backends)
        return "nccl" if self._device.type == "cuda" else "gloo"

    def device(self, device_type: str) -> torch.device:
        """The training device; for CUDA `cuda:LOCAL_RANK`, made the current device (before any
        NCCL collective, so the communicator binds to it)."""
        if device_type == "cuda":
            if "nccl" not in self.backends:
                raise CnmError(f"rank {self.rank}: training on CUDA needs the NCCL back-end, but the "
                               f"process group was formed with {'+'.join(self.backends)} only")
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise CnmError(f"rank {self.rank}: LOCAL_RANK {self.local_rank} but only {count} CUDA "
                               f"device(s) are visible; start at most {count} processes per node "
                               f"(--nproc-per-node)")
            torch.cuda.set_device(self.local_rank)
            self._device = torch.device("cuda", self.local_rank)
        elif device_type == "cpu":
            if "gloo" not in self.backends:
                raise CnmError(f"rank {self.rank}: training on the CPU needs the gloo back-end")
            self._device = torch.device("cpu")
        else:
            raise CnmError(f"unsupported device type {device_type!r} for multi-process training")
        return self._device

    # ------------------------------------------------------------------ guarded primitives
    def _error(self, what: str, detail: str) -> CnmError:
        return CnmError(f"rank {self.rank}: {what} failed ({detail}); another process stopped (see its "
                        f"output) or did not answer within {self.timeout_s:g} s (--dist-timeout)")

    @contextlib.contextmanager
    def _failures(self, what: str):
        """torch's errors (a peer died, a timeout) as one-line CnmErrors."""
        try:
            yield
        except CnmError:
            raise
        except (RuntimeError, ValueError) as e:   # dist.DistError is a RuntimeError
            raise self._error(what, first_line(e)) from None

    def _run(self, what: str, collective: Callable, *args, **kwargs) -> None:
        """Start `collective` with async_op=True and wait on the host until it completed,
        at most `timeout_s` (polling `is_completed()`: NCCL's `wait()` does not block the host
        and a hung NCCL collective never raises; the same path serves gloo)."""
        with self._failures(what):
            work = collective(*args, group=self.group, async_op=True, **kwargs)
            deadline = time.monotonic() + self.timeout_s
            pause = POLL_S[0]
            while not work.is_completed():
                if time.monotonic() >= deadline:
                    raise self._error(what, "no reply")
                time.sleep(pause)
                pause = min(2 * pause, POLL_S[1])
            work.wait()                   # raises a failed collective's error; orders the stream

    def all_reduce_sum(self, t: torch.Tensor, *, block: bool = True) -> torch.Tensor:
        if block or t.device.type == "cpu":
            self._run("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM)
        else:                             # the step: queued on the stream, NCCL's watchdog bounds it
            with self._failures("all-reduce"):
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        self._run("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return t

    def broadcast_object(self, obj, what: str = "broadcast"):
        payload = pickle.dumps(obj) if self.rank == 0 else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self._run(what, dist.broadcast, size, src=0)
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0
               else torch.empty(int(size), dtype=torch.uint8))
        self._run(what, dist.broadcast, buf, src=0)
        return pickle.loads(buf.numpy().tobytes())   # sent by rank 0 of this run, as torch does

    def _all_gather_object(self, obj, what: str) -> list:
        """Every rank's `obj` (picklable), in rank order."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._run(what, dist.all_gather, sizes, torch.tensor([payload.numel()]))
        n = max(int(s) for s in sizes)
        bufs = [torch.empty(n, dtype=torch.uint8) for _ in range(self.world)]
        self._run(what, dist.all_gather, bufs, torch.cat([payload, payload.new_zeros(n - payload.numel())]))
        return [pickle.loads(b[:int(s)].numpy().tobytes()) for b, s in zip(bufs, sizes)]

    @torch.no_grad()
    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        for flat, group in flat_groups(tensors):
            self._run("broadcast", dist.broadcast, flat, src=0)
            unflatten_into(flat, group)

    def sync_module(self, module: nn.Module | None) -> None:
        if module is not None:
            self.broadcast_tensors(list(module.parameters()) + list(module.buffers()))

    def sync_buffers(self, module: nn.Module | None) -> None:
        if module is not None:
            self.broadcast_tensors(list(module.buffers()))

    def barrier(self) -> None:
        # a tiny CPU all-reduce: bounded like every collective, and no NCCL device guessing
        self.all_reduce_sum(torch.zeros(1))

    def agree(self, error: str | None, what: str = "set-up") -> None:
        failed = [(r, e) for r, e in enumerate(self._all_gather_object(error, what)) if e is not None]
        if not failed:
            return
        if len({e for _, e in failed}) == 1 and len(failed) == self.world:
            raise CnmError(failed[0][1])  # every rank saw the same thing: say it once
        raise CnmError("; ".join(f"rank {r}: {e}" for r, e in failed))

    def on_main(self, fn: Callable[[], object], what: str = "set-up"):
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except CnmError as e:
                error = str(e)
        result, error = self.broadcast_object((result, error), what)
        if error is not None:
            raise CnmError(error)
        return result

    def grad_all_reduce(self, params: Iterable[nn.Parameter]) -> GradAllReduce:
        return GradAllReduce(params, self)

    def close(self) -> None:
        """Leave the process group (the default group; or only `group` if this comm has one)."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # noqa: BLE001, S110 - shutting down after a failure; nothing to add
                pass


def first_line(e: BaseException) -> str:
    """`Type: first sentence` of an exception (c10d/gloo source locations dropped)."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", lines[0] if lines else "")
    text = re.sub(r"\s*Check the logs of the remote worker.*$", "", text).rstrip(". ")
    if len(text) > 200:
        text = text[:199].rstrip() + "…"
    return f"{type(e).__name__}: {text}".strip()
