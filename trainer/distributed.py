"""Multi-process training (`torchrun ... -m cnm train`): the process group and the collectives the
trainer needs, with PyTorch DistributedDataParallel's semantics.

Launch (see the README): `torchrun --nproc-per-node N -m cnm train ...` on one machine, or the
same on every node with torchrun's usual rendezvous flags (`--nnodes`, `--node-rank`,
`--master-addr`, `--master-port`, or `--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`).
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` reads
them and forms the group with `init_method="env://"`: gloo for CPU tensors and, where CUDA is
available, NCCL for CUDA tensors (one group, `"cpu:gloo,cuda:nccl"`; process LOCAL_RANK trains
on `cuda:LOCAL_RANK`). Without those variables, or with WORLD_SIZE=1, it returns the
single-process `Comm` and nothing changes.

What each rank does (the same as DDP, Li et al., "PyTorch Distributed", VLDB 2020):

- Initial state: every rank builds the peers from the same seed, then rank 0's parameters and
  buffers (and, on resume, its checkpoint's momentum and EMA teacher) are broadcast
  (`sync_module`, `broadcast_tensors`), so ranks start identical even if their builds would
  differ. Only rank 0 reads `last.pt`: the other ranks need no access to the run directory.
- Gradients: `GradAllReduce` packs all gradients into one flat buffer per dtype, all-reduces it
  (SUM) and scales by 1/world -- DDP's gradient averaging. Identical parameters + identical
  averaged gradients + the same optimiser step => identical parameters after every step, and
  the EMA teacher (an on-device function of the parameters and the step count) stays identical
  too. DDP itself (`torch.nn.parallel.DistributedDataParallel`) is not used; why, and how
  this interacts with the CUDA graph of the step, is in trainer/step.py and the README:
  the all-reduce runs OUTSIDE the captured graph, between two graphs.
- BatchNorm: per rank by default (DDP's default): each rank normalises with its own batch
  statistics; the running statistics that evaluation uses are rank 0's, broadcast to every
  rank at the end of each epoch (`sync_buffers`, for the live peers and the EMA teacher) --
  exactly what DDP's `broadcast_buffers=True` leaves in rank 0's model. `--sync-bn` converts the
  BatchNorm layers (`convert_sync_batchnorm`): `torch.nn.SyncBatchNorm` on CUDA;
  `ReferenceSyncBatchNorm` (below) on the CPU, where torch's has no kernels.
- Metrics: counts and sums are all-reduced (`all_reduce_sum`): the test accuracy is the sum of
  the correct counts of every rank's shard of the test split over the split's size.
- Writes: only rank 0 (`is_main`) writes config.json, metrics.jsonl and checkpoints and prints.
- Decisions: rank 0 alone reads the checkpoint and picks the run directory (`on_main`: its
  result, or its error, reaches every rank); checks every rank makes for itself (the config on
  this machine, the data, the device) go through `everywhere`/`agree`, so an error that only
  some ranks see (a missing data directory on one node) stops every rank with the same line.
- Failure: every collective is bounded by `timeout_s` (`--dist-timeout`, the process group's
  timeout) and a failed or timed-out collective becomes a one-line `CnmError` naming this
  rank; gloo also fails at once when a peer process dies (its sockets close), and torchrun
  stops the other processes of a node when one exits with an error.

Testing hook: `CNM_FAULT="RANK:EPOCH:STEP[:raise|exit|hang]"` makes process RANK fail at step
STEP (1-based) of epoch EPOCH (1-based, as in metrics.jsonl): raise an exception, exit hard
(`os._exit`, as an OOM kill would), or hang (sleep) -- see tests/trainer/test_distributed.py.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import CnmError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0
FAULT_ENV = "CNM_FAULT"
FAULT_KINDS = ("raise", "exit", "hang")


# ----------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """torchrun's variables, checked; None when the process was not started by a launcher
    (neither RANK nor WORLD_SIZE set). A partial or malformed set is a one-line CnmError."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [v for v in ENV_VARS if not env.get(v)]
    if missing:
        raise CnmError(f"incomplete distributed environment: {', '.join(missing)} not set "
                       f"(start multi-process runs with torchrun, which sets {', '.join(ENV_VARS)})")
    try:
        rank, world, local_rank, port = (int(env[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                               "MASTER_PORT"))
    except ValueError:
        raise CnmError("distributed environment: RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must "
                       f"be integers, got {', '.join(f'{v}={env[v]!r}' for v in ENV_VARS)}") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0 or not 0 < port < 65536:
        raise CnmError(f"distributed environment: need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0 and a "
                       f"port, got RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} "
                       f"MASTER_PORT={port}")
    return LaunchEnv(rank, world, local_rank, env["MASTER_ADDR"], port)


def _first_line(e: BaseException) -> str:
    """`Type: first sentence` of an exception (c10d/gloo source locations dropped)."""
    import re

    lines = str(e).strip().splitlines()
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", lines[0] if lines else "")
    text = re.sub(r"\s*Check the logs of the remote worker.*$", "", text).rstrip(". ")
    if len(text) > 200:
        text = text[:199].rstrip() + "…"
    return f"{type(e).__name__}: {text}".strip()


# ----------------------------------------------------------------------------- communicators


class Comm:
    """The single-process communicator: rank 0 of 1, every collective is the identity.

    The trainer talks to the other processes only through this interface, so a single-process
    run goes through the same code with these no-ops. `ProcessGroupComm` is the real one.
    """

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

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device_type: str) -> torch.device:
        """The training device of this process: `cpu`, or `cuda:LOCAL_RANK`."""
        if device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(device_type)

    def describe(self) -> str:
        return "1 process"

    # collectives (identity for one process)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over all ranks, in place; returns `t`."""
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
    """A communicator over the default `torch.distributed` process group (see `init_from_env`).

    Every collective is guarded: a failure (a peer died, the group's timeout expired) becomes
    a one-line CnmError naming this rank and the operation.
    """

    def __init__(self, rank: int, world: int, local_rank: int, backends: Sequence[str] = ("gloo",),
                 timeout_s: float = DEFAULT_TIMEOUT_S, group=None, device: str | None = None):
        super().__init__(timeout_s)
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backends = tuple(backends)   # ("gloo",) or ("gloo", "nccl"): CPU / CUDA tensors
        self.group = group                # None: the default (world) group
        self._device: torch.device | None = None
        if device is not None:
            self.device(torch.device(device).type)

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

    def describe(self) -> str:
        return f"{self.world} processes ({self.backend}), rank {self.rank} on {self._device or 'no device yet'}"

    # ------------------------------------------------------------------ guarded primitives
    def _guard(self, what: str, fn: Callable, *args, **kwargs):
        import torch.distributed as dist

        try:
            return fn(*args, **kwargs)
        except CnmError:
            raise
        except (RuntimeError, ValueError, dist.DistError) as e:
            raise CnmError(f"rank {self.rank}: {what} failed ({_first_line(e)}); another process "
                           f"stopped (see its output) or did not answer within "
                           f"{self.timeout_s:g} s (--dist-timeout)") from None

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self._guard("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self._guard("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self.group)
        return t

    def broadcast_object(self, obj):
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        self._guard("broadcast", dist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    @torch.no_grad()
    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        import torch.distributed as dist

        for flat, group in _flat_groups(tensors):
            self._guard("broadcast", dist.broadcast, flat, src=0, group=self.group)
            _unflatten_into(flat, group)

    def sync_module(self, module: nn.Module | None) -> None:
        if module is not None:
            self.broadcast_tensors(list(module.parameters()) + list(module.buffers()))

    def sync_buffers(self, module: nn.Module | None) -> None:
        if module is not None:
            self.broadcast_tensors(list(module.buffers()))

    def barrier(self) -> None:
        # a tiny all-reduce: bounded by the timeout like every collective, and no NCCL device
        # guessing (dist.barrier on NCCL picks a device by rank)
        cpu = "gloo" in self.backends or self._device is None
        self.all_reduce_sum(torch.zeros(1, device="cpu" if cpu else self._device))

    def agree(self, error: str | None, what: str = "set-up") -> None:
        import torch.distributed as dist

        errors: list = [None] * self.world
        self._guard(what, dist.all_gather_object, errors, error, group=self.group)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
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
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise CnmError(error)
        return result

    def grad_all_reduce(self, params: Iterable[nn.Parameter]) -> GradAllReduce:
        return GradAllReduce(params, self)

    def close(self) -> None:
        """Leave the process group (the default group; or only `group` if this comm has one)."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # noqa: BLE001, S110 - shutting down after a failure; nothing to add
                pass


def _flat_groups(tensors: Sequence[torch.Tensor]):
    """(flat buffer, tensors) per (device, dtype): the tensors' values in one 1-d buffer."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group]) if group else None
        yield flat, group


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


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` into `tensors` (logical element order; any strides)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


# ----------------------------------------------------------------------------- start and stop


def init_from_env(device_type: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                  environ: Mapping[str, str] | None = None) -> Comm:
    """Join the process group torchrun describes; `Comm()` when not launched (or WORLD_SIZE=1).

    device_type "cpu": gloo. "cuda" or "auto" where CUDA is available: gloo for CPU tensors and
    NCCL for CUDA tensors (`"cpu:gloo,cuda:nccl"`), so the training device may still be decided
    afterwards (a resumed run takes it from rank 0's checkpoint); `comm.device("cuda")` then
    puts this process on `cuda:LOCAL_RANK`. The group must form within `timeout_s` seconds,
    otherwise a one-line CnmError (torch's message says which ranks are missing); the same bound
    holds for every later collective.
    """
    if timeout_s <= 0:
        raise CnmError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    env = launch_env(environ)
    if env is None or env.world == 1:
        return Comm(timeout_s)
    import torch.distributed as dist

    if not dist.is_available():
        raise CnmError("this torch build has no torch.distributed; multi-process training is unavailable")
    if device_type not in ("auto", "cuda", "cpu"):
        raise CnmError(f"unsupported device {device_type!r} for multi-process training")
    cuda = device_type in ("auto", "cuda") and torch.cuda.is_available()
    if cuda and not dist.is_nccl_available():
        raise CnmError("training on CUDA with several processes needs NCCL, which this torch build lacks")
    backends = ("gloo", "nccl") if cuda else ("gloo",)
    if dist.is_initialized():  # the caller formed the group (e.g. a test or an outer framework)
        if dist.get_world_size() != env.world or dist.get_rank() != env.rank:
            raise CnmError("a process group is already initialised with another rank/world size")
        comm = ProcessGroupComm(env.rank, env.world, env.local_rank, backends, timeout_s)
    else:
        where = f"{env.master_addr}:{env.master_port}"
        try:
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://",
                                    rank=env.rank, world_size=env.world,
                                    timeout=_dt.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, dist.DistError) as e:
            _destroy_quietly()
            raise CnmError(f"rank {env.rank}: could not form the process group of {env.world} processes "
                           f"at {where} within {timeout_s:g} s ({_first_line(e)}); start every process "
                           f"with the same torchrun rendezvous settings") from None
        comm = ProcessGroupComm(env.rank, env.world, env.local_rank, backends, timeout_s)
    try:
        if device_type == "cuda" and cuda:
            comm.device("cuda")
        comm.barrier()              # prove that every rank can talk to every other
    except CnmError:
        comm.close()
        raise
    return comm


@contextlib.contextmanager
def launched(device_type: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """`with launched(--device, --dist-timeout) as comm:` the communicator of this process
    (`init_from_env`), left cleanly on success. In a multi-process run an error names the rank
    it happened on and is recorded for torchrun's failure summary (TORCHELASTIC_ERROR_FILE);
    the group is not torn down on an error (NCCL's teardown can wait on the failed work), the
    process just exits."""
    comm = init_from_env(device_type, timeout_s)
    try:
        yield comm
    except CnmError as e:
        if comm.world > 1:
            msg = str(e) if str(e).startswith("rank ") else f"rank {comm.rank}: {e}"
            _record_for_torchrun(CnmError(msg))
            raise CnmError(msg) from None
        raise
    except Exception as e:
        if comm.world > 1:
            _record_for_torchrun(e)
        raise
    comm.close()


def _record_for_torchrun(e: BaseException) -> None:
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    except Exception:  # noqa: BLE001, S110 - a failure summary is a courtesy, never a second error
        pass


def _destroy_quietly() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - the caller reports the original error
        pass


# ----------------------------------------------------------------------------- gradient averaging


class GradAllReduce:
    """Average the gradients of `params` over all ranks: DDP's gradient averaging.

    All gradients of one dtype and device go into ONE flat buffer (`self.flats`), which is
    all-reduced (SUM) and scaled by 1/world; a missing gradient counts as zeros (as the
    optimiser treats it). In three parts so that the pack and unpack copies can sit inside
    CUDA graphs while the collective stays outside (trainer/step.py):

        pack(grads)    gradients -> flat buffers        (device copies; capturable)
        reduce()       all-reduce the flat buffers       (the collective; eager)
        unpack(grads)  flat / world -> gradients         (device copies; capturable)

    `__call__()` does all three on the parameters' current `.grad` (the eager step).
    Identical inputs on every rank give bitwise-identical results on every rank (an
    all-reduce returns the same bits everywhere), which keeps the replicas identical.
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
        """All-reduce (SUM) the flat buffers: the collective, on the host's current stream."""
        for flat in self.flats:
            self.comm.all_reduce_sum(flat)

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


# ----------------------------------------------------------------------------- synchronised BN


class ReferenceSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the GLOBAL batch (all ranks).

    The plain formulation of `torch.nn.SyncBatchNorm` (Peng et al., "MegDet", CVPR 2018;
    Zhang et al., "Context Encoding", CVPR 2018) from differentiable all-reduces
    (`torch.distributed.nn.functional.all_reduce`, whose backward all-reduces the incoming
    gradients), so it runs on any back-end, gloo on the CPU included, where torch's
    SyncBatchNorm has no kernels:

        N    = sum_r n_r                          (n_r = B_r*H*W elements per channel on rank r)
        mean = sum_r sum(x_r) / N
        var  = sum_r sum((x_r - mean)^2) / N      (two passes: no E[x^2]-E[x]^2 cancellation)
        y_r  = (x_r - mean) / sqrt(var + eps) * weight + bias
        running_mean += momentum * (mean - running_mean)
        running_var  += momentum * (var * N/(N-1) - running_var)

    The backward through the all-reduces gives rank r d(sum_q L_q)/dx_r, as torch's
    SyncBatchNorm does; with the step's gradient averaging the parameters then receive the
    gradient of the ranks' mean loss. Not in training mode, or without a process group of
    more than one rank, it is `nn.BatchNorm2d`. Tested against BatchNorm2d on the
    concatenated batch (tests/trainer/test_distributed.py). Input/output: float [B, C, H, W]
    (computed in at least float32, returned in the input's dtype).
    """

    @staticmethod
    def _group_size() -> int:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._group_size() < 2:
            return super().forward(x)
        if self.momentum is None:
            raise CnmError("ReferenceSyncBatchNorm needs a BatchNorm momentum (cumulative averaging "
                           "is not supported)")
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        C = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))        # bf16/fp16 -> fp32
        count = torch.full((1,), xf.numel() // C, dtype=xf.dtype, device=x.device)
        sums = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
        n = sums[C:].detach()
        mean = sums[:C] / n
        xc = xf - mean.view(1, C, 1, 1)
        var = all_reduce((xc * xc).sum((0, 2, 3))) / n
        y = xc * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                rm, rv = self.running_mean, self.running_var
                rm.lerp_(mean.detach().to(rm.dtype), self.momentum)
                unbiased = var.detach() * (n / torch.clamp(n - 1, min=1))
                rv.lerp_(unbiased.to(rv.dtype), self.momentum)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """`--sync-bn`: every BatchNorm2d of `module` becomes a synchronised one, sharing its
    parameters and buffers (state-dict keys unchanged, so checkpoints stay interchangeable).
    CUDA: `torch.nn.SyncBatchNorm.convert_sync_batchnorm`; CPU: `ReferenceSyncBatchNorm`."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_reference(module)


def _convert_reference(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, ReferenceSyncBatchNorm):
        out = ReferenceSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, device="meta")
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, _convert_reference(child))
        return out
    for name, child in module.named_children():
        new = _convert_reference(child)
        if new is not child:
            setattr(module, name, new)
    return module


# ----------------------------------------------------------------------------- fault injection


@dataclass(frozen=True)
class FaultInjector:
    """`CNM_FAULT="RANK:EPOCH:STEP[:KIND]"`: this rank fails at that step (testing hook)."""

    epoch: int        # 1-based
    step: int         # 1-based within the epoch
    kind: str         # raise | exit | hang
    rank: int

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] | None = None) -> FaultInjector | None:
        spec = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        if not spec:
            return None
        parts = spec.split(":")
        try:
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in FAULT_KINDS):
                raise ValueError
            r, e, s = (int(v) for v in parts[:3])
        except ValueError:
            raise CnmError(f"{FAULT_ENV}={spec!r}: expected RANK:EPOCH:STEP[:{'|'.join(FAULT_KINDS)}]") from None
        if r != rank:
            return None
        return cls(e, s, parts[3] if len(parts) == 4 else "raise", rank)

    def check(self, epoch0: int, step0: int) -> None:
        """Call before step `step0` (0-based) of epoch `epoch0` (0-based)."""
        if (epoch0 + 1, step0 + 1) != (self.epoch, self.step):
            return
        where = f"rank {self.rank}, epoch {self.epoch}, step {self.step}"
        if self.kind == "exit":
            os.write(2, f"{FAULT_ENV}: hard exit at {where}\n".encode())
            os._exit(17)
        if self.kind == "hang":
            os.write(2, f"{FAULT_ENV}: hanging at {where}\n".encode())
            while True:
                time.sleep(3600)
        raise RuntimeError(f"{FAULT_ENV}: injected failure at {where}")


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_VARS",
    "FAULT_ENV",
    "Comm",
    "FaultInjector",
    "GradAllReduce",
    "LaunchEnv",
    "ProcessGroupComm",
    "ReferenceSyncBatchNorm",
    "convert_sync_batchnorm",
    "init_from_env",
    "launch_env",
    "launched",
]
