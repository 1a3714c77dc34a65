"""Lazy access to the optional back-ends (ffcv, nvidia.dali, triton, matplotlib, tensorboard).

Nothing here imports a back-end at module import time. `optional(name)` returns the module or
None (and never raises, whatever the back-end's import does); `require(name)` raises a
one-line `CnmError` that names the pip extra to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from types import ModuleType

from pipeline.errors import CnmError

# import name -> (pip extra, distribution name used for the version)
BACKENDS: dict[str, tuple[str, str]] = {
    "ffcv": ("ffcv", "ffcv"),
    "nvidia.dali": ("dali", "nvidia-dali-cuda120"),
    "triton": ("triton", "triton"),
    "matplotlib": ("plot", "matplotlib"),
    "tensorboard": ("tensorboard", "tensorboard"),
}

_cache: dict[str, ModuleType | None] = {}


def optional(name: str) -> ModuleType | None:
    """The imported back-end module, or None if it is missing or fails to import."""
    if name not in _cache:
        threads = _torch_threads()
        try:
            _cache[name] = importlib.import_module(name)
        except Exception:  # a broken install counts as missing: never crash the caller
            _cache[name] = None
        finally:
            _restore_torch_threads(threads)
    return _cache[name]


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _restore_torch_threads(threads: int | None) -> None:
    """Importing ffcv calls `torch.set_num_threads(1)` for the whole process: every CPU op after
    it (training included) would run on one core, with another summation order than before the
    import. A back-end import must not change what the rest of the process computes."""
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def available(name: str) -> bool:
    return optional(name) is not None


def require(name: str, purpose: str = "") -> ModuleType:
    """The back-end module, or a one-line CnmError naming the extra that provides it."""
    mod = optional(name)
    if mod is None:
        extra = BACKENDS.get(name, (name, name))[0]
        what = f" (needed for {purpose})" if purpose else ""
        raise CnmError(f"{name} is not installed{what}: pip install 'cnm[{extra}]'")
    return mod


def version(name: str) -> str | None:
    """Installed version of a back-end's distribution, without importing it."""
    dist = BACKENDS.get(name, (name, name))[1]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def reset_cache() -> None:
    """Forget import results (tests hide back-ends from import and call this)."""
    _cache.clear()
