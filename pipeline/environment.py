"""The one environment report: versions, CPU, CUDA, git, and which loaders and kernels run here.

`describe()` is what `cnm info` prints; `run_record` what a training run records to be repeated
(RUN/config.json); `run_environment(device)` is `describe()` plus the flat
keys every `cnm bench` result stores (date, device name, load average, threading variables; see
bench/report.py for the schema). Neither raises: a back-end that is missing or fails to import is
reported as such (probed through `pipeline.backends`, which swallows import errors). A torch
that fails to import is reported too (`cnm info` exists to diagnose a broken install), so its
import here is guarded; `device_name` and `run_environment` (benchmarks) need a working torch.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import tomllib

from pipeline import backends

try:
    import torch
except Exception as _e:  # noqa: BLE001 - a broken torch must not stop `cnm info` reporting it
    torch = None
    TORCH_ERROR: str | None = f"{_e.__class__.__name__}: {str(_e).splitlines()[0] if str(_e) else ''}"
else:
    TORCH_ERROR = None

LOADERS = ("ffcv", "dali", "resident", "cpu")
KERNELS = ("triton", "torch", "reference")
REPO_ROOT = Path(__file__).resolve().parents[1]

# shown name -> (distribution for the version, import name or None)
PACKAGES = {
    "torch": ("torch", "torch"),
    "numpy": ("numpy", "numpy"),
    "ffcv": ("ffcv", "ffcv"),
    "nvidia-dali": ("nvidia-dali-cuda120", "nvidia.dali"),
    "triton": ("triton", "triton"),
    "click": ("click", None),
    "rich": ("rich", None),
}


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001 - malformed metadata must not crash `cnm info`
        return None


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded to 0.01 (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_info(root: Path = REPO_ROOT) -> dict | None:
    """{"commit": sha, "dirty": bool} of the source checkout, or None outside a git checkout."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                check=False, capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(),
                "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_info() -> dict:
    """{"available", "torch_cuda", "device_count", "devices": [name], "device": name | None,
    "capability": "9.0" | None, "bf16": bool}; "error" when torch itself cannot be imported."""
    info = {"available": False, "torch_cuda": None, "device_count": 0, "devices": [], "device": None,
            "capability": None, "bf16": False}
    if torch is None:
        info["error"] = TORCH_ERROR
        return info
    try:
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info.update(available=True, device_count=n,
                        devices=[torch.cuda.get_device_name(i) for i in range(n)])
            info["device"] = info["devices"][0] if n else None
            major, minor = torch.cuda.get_device_capability(0)
            info["capability"] = f"{major}.{minor}"
            info["bf16"] = bool(torch.cuda.is_bf16_supported())
    except Exception as e:  # noqa: BLE001 - a broken torch or driver must not crash `cnm info`
        info["error"] = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return info


def _backend(name: str, import_backends: bool = True) -> tuple[bool | None, str]:
    """(importable, note) of a back-end, with what to do when it is not. Without
    `import_backends` an installed back-end is (None, note): its import (seconds for ffcv) is
    not tried."""
    extra = backends.BACKENDS[name][0]
    if not import_backends:
        if backends.version(name) is None:
            return False, f"not installed: pip install 'cnm[{extra}]'"
        return None, f"installed {backends.version(name)}; import not tried (cnm info --check tries it)"
    if backends.available(name):
        return True, ""
    if backends.version(name) is None:
        return False, f"not installed: pip install 'cnm[{extra}]'"
    return False, "installed but fails to import"


def loaders_info(cuda: bool, import_backends: bool = True) -> dict[str, dict]:
    """{loader: {"usable": bool | None, "note": str}} for LOADERS (None: see `_backend`)."""
    ffcv_ok, ffcv_note = _backend("ffcv", import_backends)
    dali_ok, dali_note = _backend("nvidia.dali", import_backends)
    where = "GPU" if cuda else "host"
    return {
        "ffcv": {"usable": ffcv_ok,
                 "note": ffcv_note or f"reads .beton files; batches go to the {where}"},
        "dali": {"usable": dali_ok,
                 "note": dali_note or ("GPU pipeline" if cuda else "CPU pipeline only (no CUDA)")},
        "resident": {"usable": True, "note": f"whole uint8 set in {where} memory, shuffled there"},
        "cpu": {"usable": True, "note": "torch DataLoader with per-sample numpy augmentation (baseline)"},
    }


def kernels_info(cuda: bool, import_backends: bool = True) -> dict[str, dict]:
    """{kernel: {"usable": bool | None, "note": str}} for KERNELS (implementations of the Cut^nMix
    op; None: see `_backend`)."""
    tri_ok, tri_note = _backend("triton", import_backends)
    if tri_ok is not False and not cuda:
        if os.environ.get("TRITON_INTERPRET") == "1":
            tri_note = "CPU interpreter (TRITON_INTERPRET=1): correct but slow"
        else:
            tri_ok, tri_note = False, "needs CUDA (TRITON_INTERPRET=1 runs it in the slow CPU interpreter)"
    return {
        "triton": {"usable": tri_ok, "note": tri_note or "fused one-pass kernel on the GPU"},
        "torch": {"usable": True, "note": "vectorised torch ops" + (" (GPU or CPU)" if cuda else " (CPU)")},
        "reference": {"usable": True, "note": "per-sample functional oracle (slow)"},
    }


def describe(import_backends: bool = True) -> dict:
    """A JSON-able description of this environment (never raises).

    Keys: python, platform, packages {name: version | None}, cuda (see `cuda_info`), cpu_count,
    cpu_model, git ({"commit", "dirty"} | None), loaders / kernels ({name: {"usable", "note"}}),
    usable_loaders / usable_kernels (names, in preference order). `import_backends=False` does
    not import ffcv, DALI or triton (seconds): an installed one has "usable": None and is not
    counted as usable.
    """
    out: dict = {"python": platform.python_version(), "executable": sys.executable,
                 "platform": platform.platform(terse=True)}
    packages = {}
    for shown, (dist, _imp) in PACKAGES.items():
        packages[shown] = _dist_version(dist)
    if torch is not None:  # a broken torch keeps its metadata version
        packages["torch"] = torch.__version__  # the local build tag (+cpu, +cu124)
    out["packages"] = packages
    cuda = cuda_info()
    out["cuda"] = cuda
    out["cpu_count"] = cpu_count()
    out["cpu_model"] = cpu_model()
    out["git"] = git_info()
    out["loaders"] = loaders_info(cuda["available"], import_backends)
    out["kernels"] = kernels_info(cuda["available"], import_backends)
    out["usable_loaders"] = [k for k, v in out["loaders"].items() if v["usable"] is True]
    out["usable_kernels"] = [k for k, v in out["kernels"].items() if v["usable"] is True]
    return out


# environment variables that change CPU threading (and so the figures) when set
THREADING_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                  "NUMBA_THREADING_LAYER", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")


def device_name(device) -> str:
    """The name of a torch device: the GPU's (torch.cuda.get_device_name), or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() or "cpu"


def cnm_version() -> str | None:
    """The installed cnm distribution's version, else the checkout's pyproject.toml version."""
    version = _dist_version("cnm")
    if version is None:
        try:
            version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, ValueError):
            return None
    return version


def run_record(device, command: str | None = None) -> dict:
    """What a training run records to be repeated (RUN/config.json `_record`): the command
    line, cnm version, git commit and dirty flag (None outside a checkout), python, torch,
    CUDA and cuDNN versions (None on a CPU build), the device (a torch.device or its name)
    and its name, hostname and date (UTC, ISO)."""
    device = torch.device(device)
    git = git_info() or {}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"command": command, "cnm_version": cnm_version(), "git_commit": git.get("commit"),
            "git_dirty": git.get("dirty"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "device": str(device), "device_name": device_name(device), "hostname": platform.node(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_environment(device) -> dict:
    """What a benchmark result depends on: `describe()` plus flat keys for `device` (a
    torch.device or its name): date (UTC, ISO), device, device_name, device_memory_gb and
    device_capability (CUDA), cpu_model, cpu_count, load_average (at the call), python,
    platform, torch, cuda, ffcv, dali, triton, numba, threading_env, git_commit, git_dirty.
    The flat keys win over `describe()`'s where both have one."""
    device = torch.device(device)
    env = describe()
    git = env.get("git") or {}
    gpu = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"device_memory_gb": round(props.total_memory / 1e9, 1),
               "device_capability": f"{props.major}.{props.minor}"}
    flat = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        **gpu,
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        # the machine's load when the run started: on a shared machine, figures taken under a
        # load above the CPU count are slowed by contention and are not comparable
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ffcv": backends.version("ffcv"),
        "dali": backends.version("nvidia.dali"),
        "triton": backends.version("triton"),
        "numba": _dist_version("numba"),
        "threading_env": {k: os.environ[k] for k in THREADING_VARS if k in os.environ},
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
    }
    return env | flat
