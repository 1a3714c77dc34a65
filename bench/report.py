"""Presentation of `cnm bench` results: one rich table, JSON, `--save`, `--plot`.

JSON document (schema "cnm-bench/1"; keys are only ever added, never renamed):

    {"schema": "cnm-bench/1", "bench": "augment" | "train" | "op", "unit": str, "baseline": str,
     "env": {"date", "device", "device_name", "cpu_model", "cpu_count", "python", "platform",
             "torch", "cuda", "ffcv", "dali", "triton", "git_commit", "git_dirty", ...},
     "config": {... every flag of the run ...},
     "results": [{"pipeline": str, "available": bool, "reason": str (when unavailable),
                  "images_per_s": {"min", "median", "max"}, "ratio_to_cpu": x,
                  "peak_host_mb": x, "peak_device_mb": x, ...}]}

`cnm bench train` rows have "variant" and "pipeline" (the same name), "ms_per_step" and
"ratio_to_eager" in addition; `cnm bench op` rows are described in bench/op_speed.py. The env
is `pipeline.environment.run_environment`. `--save` writes the document to
`bench/results/<date>-<device>-<commit>[-train].json` with a temporary name and a rename.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from pipeline import backends
from pipeline.errors import CnmError
from pipeline.fileio import atomic_output, atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- files


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
    return escape(str(text))


@dataclass(frozen=True)
class Column:
    """One table column: header, cell of an available row, justification."""

    header: str
    cell: Callable[[dict], str]
    justify: str = "right"


def _range(r: dict) -> str:
    ips = r["images_per_s"]
    return f"{_fmt_rate(ips['min'])}-{_fmt_rate(ips['max'])}"


def _bandwidth_note(r: dict) -> str:
    if "bandwidth_gbps" not in r:
        return ""
    notes = [f"{r['bandwidth_gbps']['median']:,.1f} GB/s"]
    if r.get("fraction_of_peak") is not None:
        notes.append(f"{100 * r['fraction_of_peak']:.0f}% of {r['peak_gbps']:,.0f} GB/s peak")
    else:
        notes.append("peak unknown")
    return ", ".join(notes)


def _augment_caption(doc: dict) -> str:
    cfg, env = doc["config"], doc["env"]
    return (f"images/s = samples/s with all {cfg['peers']} peer views finished on "
            f"{env['device']} ({env.get('device_name')}); the {cfg['peers']} views of a sample "
            f"count as one image. Median (min-max) of {cfg['repeats']} timed repeats after "
            f"{cfg['warmup']} warm-up batches; x cpu = median / cpu median of this run. "
            f"Batch {cfg['batch_size']}, mode {cfg['mode']}, {cfg['dtype_resolved']} views, "
            f"{cfg.get('data_images')} images ({cfg['data']}).{_load_note(env)}")


def _train_caption(doc: dict) -> str:
    cfg, env = doc["config"], doc["env"]
    return (f"{cfg['arch']} x {cfg['peers']} peers, batch {cfg['batch_size']} (each sample "
            f"with its {cfg['peers']} views counts as one image); a step = augment + forward + "
            f"backward + optimiser + EMA. Median (min-max) of {cfg['repeats']} repeats after "
            f"{_warmup(doc)} warm-up steps; x eager = median / eager-fp32 median.{_load_note(env)}")


@dataclass(frozen=True)
class View:
    """How one kind of bench document is shown: the row name, the columns, title and caption."""

    key: str                      # the row's name field ("pipeline", "variant")
    unavailable: str              # the text in the first column of an unavailable row
    columns: tuple[Column, ...]
    title: Callable[[dict], str]
    caption: Callable[[dict], str]
    ratio: str                    # the ratio field ("ratio_to_cpu", "ratio_to_eager")


def _op_caption(doc: dict) -> str:
    cfg, env, peak = doc["config"], doc["env"], doc["peak"]
    return (f"Cut^nMix P={cfg['peers']}, mode {cfg['mode']}, {cfg['dtype_resolved']} views on "
            f"{env['device']} ({env.get('device_name')}). Median (min-max) of {cfg['repeats']} timed "
            f"regions of back-to-back calls (or CUDA-graph replays) after {cfg['warmup']} warm-up "
            f"calls. GB/s counts the uint8 source, the partners' box pixels read by every view and "
            f"the views written; peak {peak['gbps']:,.1f} GB/s ({peak['source']}); x torch = median "
            f"/ the torch row of the same B.{_load_note(env)}")


def _pct(r: dict) -> str:
    f = r.get("fraction_of_peak")
    return "-" if f is None else f"{100 * f:.1f}%"


VIEWS = {
    "augment": View(
        key="pipeline", unavailable="unavailable", ratio="ratio_to_cpu",
        columns=(Column("images/s (median)", lambda r: _fmt_rate(r["images_per_s"]["median"])),
                 Column("min-max", _range),
                 Column("x cpu", lambda r: _fmt(r.get("ratio_to_cpu"), ".1f", "x")),
                 Column("host MB", lambda r: _fmt(r.get("peak_host_mb"))),
                 Column("device MB", lambda r: _fmt(r.get("peak_device_mb"))),
                 Column("notes", _bandwidth_note, "left")),
        title=lambda doc: (f"cnm bench — augmentation pipelines ({doc['env'].get('cpu_count')} CPUs, "
                           f"commit {str(doc['env'].get('git_commit'))[:10]})"),
        caption=_augment_caption),
    "train": View(
        key="variant", unavailable="n/a", ratio="ratio_to_eager",
        columns=(Column("images/s (median)", lambda r: _fmt_rate(r["images_per_s"]["median"])),
                 Column("min-max", _range),
                 Column("ms/step", lambda r: _fmt(r["ms_per_step"]["median"], ",.1f")),
                 Column("x eager", lambda r: _fmt(r.get("ratio_to_eager"), ".2f", "x")),
                 Column("host MB", lambda r: _fmt(r.get("peak_host_mb"))),
                 Column("device MB", lambda r: _fmt(r.get("peak_device_mb"))),
                 Column("notes", lambda r: r.get("settings_text", ""), "left")),
        title=lambda doc: (f"cnm bench train — {doc['env']['device']} ({doc['env'].get('device_name')}), "
                           f"commit {str(doc['env'].get('git_commit'))[:10]}"),
        caption=_train_caption),
    "op": View(
        key="pipeline", unavailable="n/a", ratio="ratio_to_torch",
        columns=(Column("B", lambda r: f"{r['batch']:,}"),
                 Column("us/call", lambda r: _fmt(r["us_per_call"]["median"], ",.1f")),
                 Column("images/s (median)", lambda r: _fmt_rate(r["images_per_s"]["median"])),
                 Column("GB/s", lambda r: _fmt(r["bandwidth_gbps"]["median"], ",.1f")),
                 Column("% peak", _pct),
                 Column("x torch", lambda r: _fmt(r.get("ratio_to_torch"), ".1f", "x")),
                 Column("notes", lambda r: f"{r['launches_per_repeat']} calls/region", "left")),
        title=lambda doc: (f"cnm bench op — the Cut^nMix op alone, {doc['env']['device']} "
                           f"({doc['env'].get('device_name')}), commit {str(doc['env'].get('git_commit'))[:10]}"),
        caption=_op_caption),
}


def table(doc: dict):
    """A rich Table of a bench document (its kind's `View`); reasons and names shown literally."""
    view = VIEWS[doc.get("bench", "augment")]
    t = Table(title=_plain(view.title(doc)), caption=_plain(view.caption(doc)), caption_justify="left")
    t.add_column(view.key, no_wrap=True)
    for c in view.columns:
        t.add_column(c.header, justify=c.justify, no_wrap=c.justify == "right")
    for r in doc["results"]:
        name = _plain(r.get(view.key, r.get("pipeline")))
        if not r["available"]:
            blanks = [""] * (len(view.columns) - 2)
            t.add_row(name, view.unavailable, *blanks, _plain(r.get("reason", "")), style="dim")
        else:
            t.add_row(name, *(_plain(c.cell(r)) for c in view.columns))
    return t


# ----------------------------------------------------------------------------- plot


def require_matplotlib() -> None:
    """A one-line CnmError naming the `plot` extra when matplotlib is missing (call before a run)."""
    backends.require("matplotlib", "--plot")


def plot(doc: dict, path: str | os.PathLike) -> Path:
    """Median images/s per row (log scale, min-max whiskers, the baseline dashed) to a PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure  # optional back-end, checked through pipeline.backends

    rows = [r for r in doc["results"] if r["available"]]
    if not rows:
        raise CnmError("--plot: no pipeline was available, nothing to draw")
    key = "variant" if doc.get("bench") == "train" else "pipeline"
    names = [r[key] for r in rows]
    med = [r["images_per_s"]["median"] for r in rows]
    lo = [m - r["images_per_s"]["min"] for m, r in zip(med, rows)]
    hi = [r["images_per_s"]["max"] - m for m, r in zip(med, rows)]
    fig = Figure(figsize=(8, 0.5 * len(rows) + 1.6))
    ax = fig.subplots()
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
        ratio = r.get(VIEWS[doc.get("bench", "augment")].ratio)
        label = f"{m:,.0f}" + (f"  ({ratio:.1f}x)" if ratio is not None else "")
        ax.text(r["images_per_s"]["max"] * 1.15, y, label, va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path
