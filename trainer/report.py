"""`cnm report`: compare run directories side by side, and draw their learning curves.

A run is read from RUN/config.json (the resolved settings) and RUN/metrics.jsonl (one row per
finished epoch, the last line possibly torn while the run is still going: it is dropped). The
comparison keeps only the settings that differ between the runs, then every run's epochs done,
wall time (training + evaluation time of its finished epochs) and the final and best test
accuracy of the peer ensemble, the EMA teacher ensemble and every peer. Runs are sorted by final
peer-ensemble accuracy, best first. The metrics row is described in trainer/loop.py; the run
directory in trainer/checkpoint.py; usage in docs/cli.md#cnm-report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from pipeline import backends
from pipeline.errors import CnmError
from trainer.checkpoint import CONFIG, METRICS, read_jsonl
from trainer.config import DEFAULTS, FIELDS, flag_name

# settings that name or steer a run's bookkeeping, not what it computes (epochs: shown as done/total)
NOT_COMPARED = ("out", "resume", "quiet", "data", "epochs", "log", "log_every", "eval_every")
# what `_resolved` in config.json adds that changes the result (dataset and its size, processes)
RESOLVED_COMPARED = ("dataset", "num_classes", "train_images", "world", "loader")


@dataclass
class Curve:
    """final/best of one accuracy series over the epochs where it was measured (None: never)."""

    final: float | None = None
    best: float | None = None
    best_epoch: int | None = None

    def to_dict(self) -> dict:
        return {"final": self.final, "best": self.best, "best_epoch": self.best_epoch}


def curve(rows: list[dict], get) -> Curve:
    """Curve of `get(row)` (a float or None) over `rows` in epoch order."""
    c = Curve()
    for r in rows:
        v = get(r)
        if v is None:
            continue
        c.final = v
        if c.best is None or v > c.best:
            c.best, c.best_epoch = v, r["epoch"]
    return c


@dataclass
class Run:
    """One run directory, summarised (see the module docstring)."""

    path: str
    label: str
    settings: dict           # every compared setting -> value
    rows: list[dict]         # complete metrics rows, epoch order
    epochs_total: int
    wall_s: float
    ensemble: Curve
    teacher_ensemble: Curve
    peers: list[Curve]

    @property
    def epochs_done(self) -> int:
        return self.rows[-1]["epoch"] if self.rows else 0


def load_run(path: str | Path) -> Run:
    """Read one run directory (one-line CnmError when `path` is not one)."""
    p = Path(path)
    if not p.is_dir():
        raise CnmError(f"{p}: no such run directory")
    cfg_path = p / CONFIG
    if not cfg_path.is_file():
        raise CnmError(f"{p}: not a cnm run directory (no {CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CnmError(f"{cfg_path}: cannot read the run's settings ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("epochs"), int):
        raise CnmError(f"{cfg_path}: not a cnm run config (no epochs)")
    resolved = cfg.get("_resolved") or {}
    settings = {k: cfg.get(k, DEFAULTS[k]) for k in FIELDS if k not in NOT_COMPARED}
    settings.update({k: resolved.get(k) for k in RESOLVED_COMPARED})
    rows = sorted((r for r in read_jsonl(p / METRICS) if isinstance(r.get("epoch"), int)),
                  key=lambda r: r["epoch"])
    n_peers = cfg.get("peers") or max((len(r.get("test_acc") or []) for r in rows), default=0)
    return Run(
        path=str(p), label=p.name or str(p), settings=settings, rows=rows, epochs_total=cfg["epochs"],
        wall_s=sum((r.get("epoch_s") or 0.0) + (r.get("eval_s") or 0.0) for r in rows),
        ensemble=curve(rows, lambda r: r.get("ensemble_acc")),
        teacher_ensemble=curve(rows, lambda r: r.get("teacher_ensemble_acc")),
        peers=[curve(rows, lambda r, k=k: (r.get("test_acc") or [None] * n_peers)[k]) for k in range(n_peers)],
    )


def load_runs(paths) -> list[Run]:
    """Every run, sorted by final peer-ensemble accuracy (best first; runs without one last).
    Labels are the directory names, or the paths as given where two names collide."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise CnmError("cnm report needs at least one run directory")
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = r.path
    return sorted(runs, key=lambda r: (r.ensemble.final is None, -(r.ensemble.final or 0.0), r.label))


def differing(runs: list[Run]) -> list[str]:
    """The compared settings whose values are not the same in every run (field order)."""
    keys = list(runs[0].settings)
    return [k for k in keys if len({json.dumps(r.settings.get(k)) for r in runs}) > 1]


def to_records(runs: list[Run]) -> list[dict]:
    """JSON-able summaries, in report order: run, path, settings (the differing ones only),
    epochs_done, epochs_total, wall_s, ensemble / teacher_ensemble {final, best, best_epoch}
    (accuracies in %; None where never measured), peers [{final, best, best_epoch}]."""
    keys = differing(runs)
    return [{"run": r.label, "path": r.path, "settings": {k: r.settings[k] for k in keys},
             "epochs_done": r.epochs_done, "epochs_total": r.epochs_total, "wall_s": r.wall_s,
             "ensemble": r.ensemble.to_dict(), "teacher_ensemble": r.teacher_ensemble.to_dict(),
             "peers": [c.to_dict() for c in r.peers]} for r in runs]


def to_json(runs: list[Run]) -> str:
    return json.dumps({"runs": to_records(runs)}, indent=2)


def to_csv(runs: list[Run]) -> str:
    """One line per run; columns: run, path, the differing settings, epochs_done, epochs_total,
    wall_s, then <series>_final/_best/_best_epoch for ensemble, teacher_ensemble, peer1..peerP."""
    recs = to_records(runs)
    width = max(len(r["peers"]) for r in recs)
    series = ["ensemble", "teacher_ensemble"] + [f"peer{k + 1}" for k in range(width)]
    head = ["run", "path", *recs[0]["settings"], "epochs_done", "epochs_total", "wall_s"]
    head += [f"{s}_{part}" for s in series for part in ("final", "best", "best_epoch")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for rec in recs:
        curves = [rec["ensemble"], rec["teacher_ensemble"]] + rec["peers"] + [Curve().to_dict()] * (
            width - len(rec["peers"]))
        w.writerow([rec["run"], rec["path"], *(_setting(v) for v in rec["settings"].values()),
                    rec["epochs_done"], rec["epochs_total"], f"{rec['wall_s']:.1f}"]
                   + ["" if c[part] is None else c[part] for c in curves for part in ("final", "best", "best_epoch")])
    return buf.getvalue()


def _setting(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float) and v.is_integer():
        return f"{v:g}"
    return str(v)


def _duration(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _acc(c: Curve, best: bool) -> str:
    if best:
        return "-" if c.best is None else f"{c.best:.2f} (ep {c.best_epoch})"
    return "-" if c.final is None else f"{c.final:.2f}"


def table_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) of the comparison table, top to bottom."""
    out = [(flag_name(k) if k in FIELDS else k, [_setting(r.settings[k]) for r in runs]) for k in differing(runs)]
    out.append(("epochs", [f"{r.epochs_done}/{r.epochs_total}" for r in runs]))
    out.append(("wall time", [_duration(r.wall_s) for r in runs]))
    series = [("peer ensemble", lambda r: r.ensemble), ("EMA teacher ensemble", lambda r: r.teacher_ensemble)]
    series += [(f"peer {k + 1}", lambda r, k=k: r.peers[k] if k < len(r.peers) else Curve())
               for k in range(max(len(r.peers) for r in runs))]
    for name, get in series:
        out.append((f"{name} final", [_acc(get(r), best=False) for r in runs]))
        out.append((f"{name} best", [_acc(get(r), best=True) for r in runs]))
    return out


def render_table(runs: list[Run]):
    """A rich Table: one column per run (report order), one line per table_rows entry."""
    t = Table(title=f"{len(runs)} run(s), sorted by final peer-ensemble test accuracy (%)", title_justify="left")
    t.add_column("", style="bold", no_wrap=True)
    for r in runs:
        t.add_column(r.label, justify="right", no_wrap=True)
    for label, cells in table_rows(runs):
        t.add_row(label, *cells)
    return t


def require_plotting() -> None:
    """A one-line CnmError naming the `plot` extra when matplotlib is missing."""
    backends.require("matplotlib", "cnm report --plot")


def plot(runs: list[Run], path: str | Path) -> Path:
    """Test accuracy (peer ensemble solid, EMA teacher ensemble dashed) and training loss (total
    per step, summed over peers) against epoch, one colour per run, to a PNG."""
    require_plotting()
    from matplotlib.figure import Figure  # the Agg canvas, no GUI back-end and no pyplot state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        for key, style, suffix in (("ensemble_acc", "-", ""), ("teacher_ensemble_acc", "--", " (EMA teacher)")):
            pts = [(row["epoch"], row[key]) for row in r.rows if row.get(key) is not None]
            if pts:
                acc_ax.plot(*zip(*pts), style, color=color, marker="." if len(pts) < 30 else None,
                            label=r.label + suffix)
        pts = [(row["epoch"], row["loss"]) for row in r.rows
               if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"])]
        if pts:
            loss_ax.plot(*zip(*pts), "-", color=color, marker="." if len(pts) < 30 else None, label=r.label)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="peer ensemble (solid), EMA teacher (dashed)")
    loss_ax.set(xlabel="epoch", ylabel="training loss per step (sum over peers)", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    out = Path(path)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise CnmError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    return out
