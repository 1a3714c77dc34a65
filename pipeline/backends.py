"""Lazy access to the optional back-ends (ffcv, nvidia.dali, triton).

Nothing here imports a back-end at module import time. `optional(name)` returns the module or
None (and never raises, whatever the back-end's import does); `require(name)` raises a
one-line `CnmError` that names the pip extra to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from pipeline.errors import CnmError

# import name -> (pip extra, distribution name used for the version)
BACKENDS: dict[str, tuple[str, str]] = {
    "ffcv": ("ffcv", "ffcv"),
    "nvidia.dali": ("dali", "nvidia-dali-cuda120"),
    "triton": ("triton", "triton"),
}

_cache: dict[str, ModuleType | None] = {}


def optional(name: str) -> ModuleType | None:
    """The imported back-end module, or None if it is missing or fails to import."""
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(name)
        except Exception:  # a broken install counts as missing: never crash the caller
            _cache[name] = None
    return _cache[name]


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
