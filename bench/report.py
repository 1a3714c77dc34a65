"""Presentation of `cnm bench` results: environment, rich tables, JSON, `--save`, `--plot`.

JSON document (schema "cnm-bench/1"; keys are only ever added, never renamed):

    {"schema": "cnm-bench/1", "bench": "augment" | "train", "unit": str, "baseline": str,
     "env": {"date", "device", "device_name", "cpu_model", "cpu_count", "python", "platform",
             "torch", "cuda", "ffcv", "dali", "triton", "git_commit", "git_dirty", ...},
     "config": {... every flag of the run ...},
     "results": [{"pipeline": str, "available": bool, "reason": str (when unavailable),
                  "images_per_s": {"min", "median", "max"}, "ratio_to_cpu": x,
                  "peak_host_mb": x, "peak_device_mb": x, ...}]}

`cnm bench train` rows have "variant" and "pipeline" (the same name), "ms_per_step" and
"ratio_to_eager" in addition. `--save` writes the document to
`bench/results/<date>-<device>-<commit>[-train].json` with a temporary name and a rename.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from pipeline.errors import CnmError

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit hash, working tree has uncommitted changes) of the checkout cnm runs from."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), (bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


# environment variables that change CPU threading (and so the figures) when set
THREADING_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                  "NUMBA_THREADING_LAYER", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _dist_version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _describe() -> dict:
    """pipeline.environment.describe() when that module exists and works, else {}."""
    try:
        from pipeline.environment import describe
    except Exception:
        return {}
    try:
        info = describe()
    except Exception:
        return {}
    return dict(info) if isinstance(info, dict) else {}


def environment(device: torch.device | str) -> dict:
    """What a result depends on: date, device, CPU, library versions, git commit."""
    from bench.harness import cpu_count
    from pipeline.backends import version

    device = torch.device(device)
    env = _describe()
    commit, dirty = git_state()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        gpu = {"device_memory_gb": round(props.total_memory / 1e9, 1),
               "device_capability": f"{props.major}.{props.minor}"}
    else:
        name, gpu = cpu_model() or "cpu", {}
    ours = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
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
        "ffcv": version("ffcv"),
        "dali": version("nvidia.dali"),
        "triton": version("triton"),
        "numba": _dist_version("numba"),
        "threading_env": {k: os.environ[k] for k in THREADING_VARS if k in os.environ},
        "git_commit": commit,
        "git_dirty": dirty,
    }
    # the documented keys are always ours (same meaning in every file); describe() adds the rest
    for key, value in env.items():
        ours.setdefault(key, value)
    return ours


# ----------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary sibling and a rename: never a half-written file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=parent)
    except OSError as e:
        raise CnmError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CnmError(f"{path}: write failed ({e.strerror or e}); nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n"


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_text(path, to_json(doc))
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def save_path(doc: dict, results_dir: str | os.PathLike | None = None) -> Path:
    """bench/results/<date>-<device>-<commit>[-train].json for a bench document.

    date: YYYY-MM-DD (UTC) of the run; device: the device name, slugged ("nvidia-h100-80gb-hbm3",
    or the CPU model on CPU); commit: the first 10 hex digits (+"-dirty" for uncommitted changes).
    """
    env = doc.get("env", {})
    date = str(env.get("date", ""))[:10] or _dt.date.today().isoformat()
    device = _slug(str(env.get("device_name") or env.get("device") or "unknown"))
    if env.get("device", "").startswith("cpu") and not device.startswith("cpu"):
        device = "cpu-" + device
    commit = (env.get("git_commit") or "nocommit")[:10]
    if env.get("git_dirty"):
        commit += "-dirty"
    suffix = "" if doc.get("bench", "augment") == "augment" else f"-{doc['bench']}"
    return Path(results_dir or RESULTS_DIR) / f"{date}-{device}-{commit}{suffix}.json"


def save(doc: dict, results_dir: str | os.PathLike | None = None) -> Path:
    return write_json(doc, save_path(doc, results_dir))


# ----------------------------------------------------------------------------- table


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _fmt(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _warmup(doc: dict):
    done = [r.get("warmup_steps") for r in doc["results"] if r.get("available")]
    return done[0] if done else doc["config"].get("warmup")


def _load_note(env: dict) -> str:
    """A warning in the caption when the machine was busier than its CPU count at the start."""
    load, cpus = env.get("load_average"), env.get("cpu_count")
    if not load or not cpus:
        return ""
    note = f" Load average at start {load[0]:.1f} on {cpus} CPUs"
    return note + (" (busy machine: contention slows every row)." if load[0] > cpus else ".")


def _plain(text) -> str:
    """Cell text shown literally by rich (no markup: "cnm[ffcv]" must stay as it is)."""
    from rich.markup import escape

    return escape(str(text))


def augment_table(doc: dict):
    """A rich Table of an augment bench document."""
    from rich.table import Table

    cfg, env = doc["config"], doc["env"]
    caption = (f"images/s = samples/s with all {cfg['peers']} peer views finished on "
               f"{env['device']} ({env.get('device_name')}); the {cfg['peers']} views of a sample "
               f"count as one image. Median (min-max) of {cfg['repeats']} timed repeats after "
               f"{cfg['warmup']} warm-up batches; x cpu = median / cpu median of this run. "
               f"Batch {cfg['batch_size']}, mode {cfg['mode']}, {cfg['dtype_resolved']} views, "
               f"{cfg.get('data_images')} images ({cfg['data']}).{_load_note(env)}")
    table = Table(title=_plain(f"cnm bench — augmentation pipelines ({env.get('cpu_count')} CPUs, "
                               f"commit {str(env.get('git_commit'))[:10]})"), caption=_plain(caption),
                  caption_justify="left")
    table.add_column("pipeline", no_wrap=True)
    table.add_column("images/s (median)", justify="right", no_wrap=True)
    table.add_column("min-max", justify="right", no_wrap=True)
    table.add_column("x cpu", justify="right", no_wrap=True)
    table.add_column("host MB", justify="right", no_wrap=True)
    table.add_column("device MB", justify="right", no_wrap=True)
    table.add_column("notes")
    for r in doc["results"]:
        if not r["available"]:
            table.add_row(_plain(r["pipeline"]), "unavailable", "", "", "", "",
                          _plain(r.get("reason", "")), style="dim")
            continue
        ips = r["images_per_s"]
        notes = []
        if "bandwidth_gbps" in r:
            notes.append(f"{r['bandwidth_gbps']['median']:,.1f} GB/s")
            if r.get("fraction_of_peak") is not None:
                notes.append(f"{100 * r['fraction_of_peak']:.0f}% of {r['peak_gbps']:,.0f} GB/s peak")
            else:
                notes.append("peak unknown")
        table.add_row(_plain(r["pipeline"]), _fmt_rate(ips["median"]),
                      f"{_fmt_rate(ips['min'])}-{_fmt_rate(ips['max'])}",
                      _fmt(r.get("ratio_to_cpu"), ".1f", "x"),
                      _fmt(r.get("peak_host_mb")), _fmt(r.get("peak_device_mb")), _plain(", ".join(notes)))
    return table


def train_table(doc: dict):
    """A rich Table of a train-step bench document."""
    from rich.table import Table

    cfg, env = doc["config"], doc["env"]
    caption = (f"{cfg['arch']} x {cfg['peers']} peers, batch {cfg['batch_size']} (each sample "
               f"with its {cfg['peers']} views counts as one image); a step = augment + forward + "
               f"backward + optimiser + EMA. Median (min-max) of {cfg['repeats']} repeats after "
               f"{_warmup(doc)} warm-up steps; x eager = median / eager-fp32 median.{_load_note(env)}")
    table = Table(title=_plain(f"cnm bench train — {env['device']} ({env.get('device_name')}), "
                               f"commit {str(env.get('git_commit'))[:10]}"), caption=_plain(caption),
                  caption_justify="left")
    table.add_column("variant", no_wrap=True)
    table.add_column("images/s (median)", justify="right", no_wrap=True)
    table.add_column("min-max", justify="right", no_wrap=True)
    table.add_column("ms/step", justify="right", no_wrap=True)
    table.add_column("x eager", justify="right", no_wrap=True)
    table.add_column("host MB", justify="right", no_wrap=True)
    table.add_column("device MB", justify="right", no_wrap=True)
    table.add_column("notes")
    for r in doc["results"]:
        if not r["available"]:
            table.add_row(_plain(r["variant"]), "n/a", "", "", "", "", "", _plain(r.get("reason", "")),
                          style="dim")
            continue
        ips = r["images_per_s"]
        table.add_row(_plain(r["variant"]), _fmt_rate(ips["median"]),
                      f"{_fmt_rate(ips['min'])}-{_fmt_rate(ips['max'])}",
                      _fmt(r["ms_per_step"]["median"], ",.1f"),
                      _fmt(r.get("ratio_to_eager"), ".2f", "x"),
                      _fmt(r.get("peak_host_mb")), _fmt(r.get("peak_device_mb")),
                      _plain(r.get("settings_text", "")))
    return table


def table(doc: dict):
    return train_table(doc) if doc.get("bench") == "train" else augment_table(doc)


def markdown_table(doc: dict) -> str:
    """The results as a GitHub Markdown table (for the README)."""
    train = doc.get("bench") == "train"
    if train:
        lines = ["| variant | images/s (median) | min–max | ms/step | × eager |", "|---|--:|--:|--:|--:|"]
    else:
        lines = ["| pipeline | images/s (median) | min–max | × cpu | peak host MB | peak device MB |",
                 "|---|--:|--:|--:|--:|--:|"]
    for r in doc["results"]:
        name = r.get("variant", r["pipeline"])
        if not r["available"]:
            lines.append(f"| {name} | unavailable: {r.get('reason', '')} |" + " |" * (3 if train else 4))
            continue
        ips = r["images_per_s"]
        rng = f"{_fmt_rate(ips['min'])}–{_fmt_rate(ips['max'])}"
        if train:
            lines.append(f"| {name} | {_fmt_rate(ips['median'])} | {rng} | "
                         f"{r['ms_per_step']['median']:,.1f} | {_fmt(r.get('ratio_to_eager'), '.2f', '×')} |")
        else:
            lines.append(f"| {name} | {_fmt_rate(ips['median'])} | {rng} | "
                         f"{_fmt(r.get('ratio_to_cpu'), '.1f', '×')} | {_fmt(r.get('peak_host_mb'))} | "
                         f"{_fmt(r.get('peak_device_mb'))} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot


def require_matplotlib():
    """matplotlib.pyplot with the Agg back-end, or a one-line CnmError naming the `plot` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        raise CnmError("--plot needs matplotlib: pip install 'cnm[plot]'") from None
    return plt


def plot(doc: dict, path: str | os.PathLike) -> Path:
    """Median images/s per row (log scale, min-max whiskers, the baseline dashed) to a PNG."""
    plt = require_matplotlib()
    rows = [r for r in doc["results"] if r["available"]]
    if not rows:
        raise CnmError("--plot: no pipeline was available, nothing to draw")
    key = "variant" if doc.get("bench") == "train" else "pipeline"
    names = [r[key] for r in rows]
    med = [r["images_per_s"]["median"] for r in rows]
    lo = [m - r["images_per_s"]["min"] for m, r in zip(med, rows)]
    hi = [r["images_per_s"]["max"] - m for m, r in zip(med, rows)]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    ys = list(range(len(rows)))
    ax.errorbar(med, ys, xerr=[lo, hi], fmt="o", color="tab:blue", ecolor="tab:gray", capsize=3)
    ax.set_yticks(ys, names)
    ax.set_xscale("log")
    ax.invert_yaxis()
    top = max(r["images_per_s"]["max"] for r in rows)
    bottom = min(r["images_per_s"]["min"] for r in rows)
    ax.set_xlim(bottom / 2, top * 6)
    ax.grid(axis="x", which="both", alpha=0.3)
    base = rows[0] if key == "variant" else next((r for r in rows if r["pipeline"] == doc.get("baseline")), None)
    if base is not None:
        ax.axvline(base["images_per_s"]["median"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"{base[key]} (baseline)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("images/s (all peer views of a sample = one image), log scale; median, min-max")
    env = doc["env"]
    ax.set_title(f"cnm bench {doc.get('bench', 'augment')} — {env.get('device_name')} "
                 f"({str(env.get('git_commit'))[:10]})", fontsize=10)
    for y, (m, r) in zip(ys, zip(med, rows)):
        ratio = r.get("ratio_to_cpu") if key == "pipeline" else r.get("ratio_to_eager")
        label = f"{m:,.0f}" + (f"  ({ratio:.1f}x)" if ratio is not None else "")
        ax.text(r["images_per_s"]["max"] * 1.15, y, label, va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
        os.close(fd)
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CnmError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path
