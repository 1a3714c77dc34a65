"""torchrun's environment -> this process's communicator.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` checks
them and forms the group with `init_method="env://"`: gloo for CPU tensors and, where CUDA is
available, NCCL for CUDA tensors (`"cpu:gloo,cuda:nccl"`, bound to `cuda:LOCAL_RANK` with
`device_id`). Not launched, or WORLD_SIZE=1: the single-process `Comm`. `launched` is the
context manager `cnm train` runs in. See docs/distributed.md#launch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from pipeline.choices import DEVICES
from pipeline.errors import CnmError
from trainer.distributed.comm import DEFAULT_TIMEOUT_S, Comm, ProcessGroupComm, first_line

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# An NCCL group's own timeout (its watchdog aborts the process) is --dist-timeout plus this, so
# that the communicator's bounded wait reports first, with its one line.
NCCL_WATCHDOG_MARGIN_S = 30.0


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


def init_from_env(device_type: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                  environ: Mapping[str, str] | None = None) -> Comm:
    """Join the process group torchrun describes; `Comm()` when not launched (or WORLD_SIZE=1).

    device_type "cpu": gloo. "cuda" or "auto" where CUDA is available: gloo for CPU tensors and
    NCCL for CUDA tensors, so the training device may still be decided afterwards (a resumed
    run takes it from rank 0's checkpoint); `comm.device("cuda")` then puts this process on
    `cuda:LOCAL_RANK`. The group must form within `timeout_s` seconds (gloo; NCCL: plus
    NCCL_WATCHDOG_MARGIN_S), otherwise a one-line CnmError (torch's message says which ranks
    are missing).
    """
    if timeout_s <= 0:
        raise CnmError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    env = launch_env(environ)
    if env is None or env.world == 1:
        return Comm(timeout_s)
    if not dist.is_available():
        raise CnmError("this torch build has no torch.distributed; multi-process training is unavailable")
    if device_type not in DEVICES:
        raise CnmError(f"unsupported device {device_type!r} for multi-process training")
    cuda = device_type in ("auto", "cuda") and torch.cuda.is_available()
    if cuda and not dist.is_nccl_available():
        raise CnmError("training on CUDA with several processes needs NCCL, which this torch build lacks")
    backends = ("gloo", "nccl") if cuda else ("gloo",)
    if dist.is_initialized():  # the caller formed the group (e.g. a test or an outer framework)
        if dist.get_world_size() != env.world or dist.get_rank() != env.rank:
            raise CnmError("a process group is already initialised with another rank/world size")
    else:
        _form_group(env, cuda, timeout_s)
    comm = ProcessGroupComm(env.rank, env.world, env.local_rank, backends, timeout_s)
    try:
        if device_type == "cuda" and cuda:
            comm.device("cuda")
        comm.barrier()              # prove that every rank can talk to every other
    except CnmError:
        comm.close()
        raise
    return comm


def _form_group(env: LaunchEnv, cuda: bool, timeout_s: float) -> None:
    """`init_process_group` from torchrun's variables; NCCL bound to `cuda:LOCAL_RANK`
    (`device_id`: the communicator forms now, on the right device) where that device exists."""
    group_timeout_s = timeout_s + (NCCL_WATCHDOG_MARGIN_S if cuda else 0.0)
    device_id = (torch.device("cuda", env.local_rank)
                 if cuda and env.local_rank < torch.cuda.device_count() else None)
    try:
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://",
                                rank=env.rank, world_size=env.world, device_id=device_id,
                                timeout=dt.timedelta(seconds=group_timeout_s))
    except (RuntimeError, ValueError) as e:
        _destroy_quietly()
        raise CnmError(f"rank {env.rank}: could not form the process group of {env.world} processes at "
                       f"{env.master_addr}:{env.master_port} within {group_timeout_s:g} s "
                       f"({first_line(e)}); start every process with the same torchrun rendezvous "
                       f"settings") from None


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
        ErrorHandler().record_exception(e)
    except Exception:  # noqa: BLE001, S110 - a failure summary is a courtesy, never a second error
        pass


def _destroy_quietly() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - the caller reports the original error
        pass
