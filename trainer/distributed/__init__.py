"""Multi-process training (`torchrun ... -m cnm train`) with DistributedDataParallel's semantics.

- `launch`: torchrun's environment -> the process group (`init_from_env`, `launched`);
- `comm`: the communicator the trainer talks through (`Comm`, the single-process null object,
  and `ProcessGroupComm`), every per-epoch collective bounded by `--dist-timeout`;
- `grads`: the step's gradient averaging (`GradAllReduce`);
- `syncbn`: `--sync-bn` (`convert_sync_batchnorm`, `ReferenceSyncBatchNorm` for the CPU);
- `fault`: the `CNM_FAULT` testing hook.

What each rank does, how failures surface (gloo and NCCL) and how to launch: docs/distributed.md.
"""

from trainer.distributed.comm import DEFAULT_TIMEOUT_S, Comm, ProcessGroupComm
from trainer.distributed.fault import FAULT_ENV, FaultInjector
from trainer.distributed.grads import GradAllReduce
from trainer.distributed.launch import ENV_VARS, LaunchEnv, init_from_env, launch_env, launched
from trainer.distributed.syncbn import ReferenceSyncBatchNorm, convert_sync_batchnorm

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
