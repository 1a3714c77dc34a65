"""Ablation of the framework's terms at a fixed budget and N seeds (`python -m bench.ablation`).

Trains, with the same data, architecture, budget and seeds, the rows of ROWS (independent peers,
Cut^nMix alone, CutMix + KD, DML, the full framework with CutMix, the full framework with cnm's
defaults, without mixing, and with unaligned views), each as a `cnm train` run (subprocesses,
`--jobs` at a time, one CPU thread each by default; or in this process with `--in-process`). From every run's metrics.jsonl it reads the
final and best peer-ensemble (`ensemble_acc`) and EMA-teacher-ensemble (`teacher_ensemble_acc`)
accuracies, the teacher ensemble where the budget's mixing stops (how far mixing has slowed the
run there), the final mean peer accuracy (`test_acc`) and how often the peers disagree
(`disagreement`: where the ensemble can gain over them), and prints a markdown table of
mean ± sample standard deviation over seeds (or `--json`). A run that fails marks its row
failed (the other seeds still count, with the number of runs that finished). `--save FILE.md`
writes the table headed with the command, commit, machine and wall time. The ramp-up scales with
the budget (cnm's 80 of 300 epochs) unless `--rampup-epochs` is given. See docs/design.md#evidence.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.environment import cpu_model, git_info, load_average
from pipeline.errors import CnmError
from pipeline.fileio import atomic_write_text
from trainer.config import FIELDS, RAMPUP_FRACTION, field_type, make_config, resolve_mix_off, resolve_rampup
from trainer.loop import train
from trainer.rundir import RunLock
from trainer.teacher import EMATeacher, resolve_decay

REPO_ROOT = Path(__file__).resolve().parent.parent
# (name, what it is, the `cnm train` flags that make it)
ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("independent", "independent peers", ("--mix", "none", "--teacher", "none", "--no-fml")),
    ("cutnmix", "Cut^nMix alone", ("--teacher", "none", "--no-fml")),
    ("cutmix+kd", "CutMix + KD (EMA teacher)", ("--mix", "cutmix", "--no-fml")),
    ("dml", "DML (peers teacher, FML)", ("--teacher", "peers", "--mix", "none")),
    ("full-cutmix", "full framework, CutMix", ("--mix", "cutmix")),
    ("full", "full framework (defaults)", ()),
    # the defaults less mixing: on the offline set it showed the gain is the EMA teacher's and FML's
    ("full-nomix", "full framework without mixing", ("--mix", "none")),
    ("full-unaligned", "full framework, unaligned views", ("--no-align-views",)),
)
ROW_NAMES = tuple(r[0] for r in ROWS)
METRICS = ("ens_final", "ens_best", "teacher_final", "teacher_best", "teacher_at_mix_off", "peer_final",
           "disagreement")



@dataclass
class RunResult:
    row: str
    seed: int
    run: str
    ok: bool
    seconds: float
    metrics: dict = field(default_factory=dict)     # METRICS -> float | None
    error: str | None = None


def summarize_metrics(rows: list[dict], mix_off: int | None = None) -> dict:
    """metrics.jsonl rows -> {ens_final, ens_best, teacher_final, teacher_best, teacher_at_mix_off,
    peer_final, disagreement} (accuracies in %; teacher_* None without an EMA teacher;
    disagreement: the last epoch's, None for one peer or rows written before it existed; best
    over the evaluated epochs: with `--eval-every N` the others have null accuracies, the last
    epoch is always evaluated; teacher_at_mix_off: the teacher ensemble after epoch `mix_off`,
    where the budget's mixing stops, None when that epoch was not evaluated or `mix_off` is None)."""
    if not rows:
        raise CnmError("no metrics rows")
    last = rows[-1]
    if last["ensemble_acc"] is None:
        raise CnmError(f"epoch {last['epoch']} was not evaluated")
    ensembles = [r["ensemble_acc"] for r in rows if r["ensemble_acc"] is not None]
    teachers = [r["teacher_ensemble_acc"] for r in rows if r.get("teacher_ensemble_acc") is not None]
    at = next((r.get("teacher_ensemble_acc") for r in rows if r["epoch"] == mix_off), None)
    return {"ens_final": last["ensemble_acc"], "ens_best": max(ensembles),
            "teacher_final": last.get("teacher_ensemble_acc"),
            "teacher_best": max(teachers) if teachers else None, "teacher_at_mix_off": at,
            "peer_final": sum(last["test_acc"]) / len(last["test_acc"]),
            "disagreement": last.get("disagreement")}


def read_metrics(run: Path, epochs: int, mix_off: int | None = None) -> dict:
    """The summary of `run`/metrics.jsonl (`summarize_metrics`); CnmError unless it holds all
    `epochs` epochs."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise CnmError(f"{path}: missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < epochs:
        raise CnmError(f"{path}: {len(rows)} of {epochs} epochs")
    return summarize_metrics(rows[:epochs], mix_off)


def mean_spread(values: list[float | None]) -> tuple[float, float] | None:
    """(mean, sample std; 0 for one value) of the non-None values, or None when there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def mix_off_epoch(args) -> int | None:
    """The epoch after which this budget's mixing rows stop mixing (`--mix-off-epoch` of the extra
    flags, else auto), the same for every row so that they compare there; None: they mix throughout."""
    epoch = resolve_mix_off(settings_from_argv(shlex.split(args.extra)).get("mix_off_epoch", "auto"), args.epochs)
    return epoch if epoch < args.epochs else None


def train_args(args, row_flags: tuple[str, ...], seed: int, out: Path) -> list[str]:
    """The `cnm train` arguments of one run."""
    rampup = args.rampup_epochs if args.rampup_epochs is not None else round(args.epochs * RAMPUP_FRACTION, 2)
    a = ["--data", str(args.data), "--arch", args.arch, "--peers", str(args.peers),
         "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
         "--schedule", args.schedule, "--rampup-epochs", str(rampup), "--device", args.device,
         "--seed", str(seed), "--out", str(out), "--quiet"]
    if args.limit_train is not None:
        a += ["--limit-train", str(args.limit_train)]
    return a + list(row_flags) + shlex.split(args.extra)


def _run_subprocess(argv: list[str], log: Path, threads: int) -> str | None:
    """`python -m cnm train ARGV` with `threads` CPU threads; None on success, else the error."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "cnm", "train", *argv], check=False, stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT).returncode
    if rc == 0:
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"exit {rc}: {lines[-1] if lines else 'no output'}"


def settings_from_argv(argv: list[str]) -> dict:
    """`cnm train` flags as written by `train_args` -> TrainConfig values (typed by the fields)."""
    # `--flag=value` (as `--extra` may write it) is `--flag value`
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--") and "=" in a else (a,))]
    values, i = {}, 0
    while i < len(argv):
        flag = argv[i][2:].replace("-", "_")
        if flag.startswith("no_") and flag[3:] in FIELDS and field_type(flag[3:]) is bool:
            values[flag[3:]], i = False, i + 1
        elif flag in FIELDS and field_type(flag) is bool:
            values[flag], i = True, i + 1
        elif flag in FIELDS:
            typ = field_type(flag)
            raw = argv[i + 1]
            values[flag] = typ(raw) if typ in (int, float) else raw
            i += 2
        else:
            raise CnmError(f"unknown cnm train flag {argv[i]!r}")
    return values


# config.json keys that name the run or its machine, not what it trained
_NOT_SETTINGS = ("out", "resume", "allow_new_data", "quiet", "log", "log_every", "device", "peer_exec",
                 "loader", "bf16", "channels_last", "cuda_graphs")
# settings added after runs were made, with the value that gives the behaviour from before: a
# config.json without the key trained with that value
_ADDED_LATER = {"mix_target": "area", "mix_on_epoch": 0}


def settings_differ(out: Path, argv: list[str]) -> list[str]:
    """What a finished run in `out` trained with that the `cnm train` arguments `argv` would not:
    one "key: run R, now N" per differing setting of its config.json (auto values resolved as
    `cnm train` resolves them; the EMA decay with the run's own steps per epoch), "key: not
    recorded" where the run predates the setting. Empty when `--reuse` may reuse it."""
    try:
        run = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CnmError(f"{out}/config.json: unreadable ({e})") from e
    cfg = make_config(None, settings_from_argv(argv))
    now = cfg.to_dict()
    now.update(rampup_epochs=resolve_rampup(cfg.rampup_epochs, cfg.epochs),
               mix_off_epoch=resolve_mix_off(cfg.mix_off_epoch, cfg.epochs))
    steps = run.get("_resolved", {}).get("steps_per_epoch")
    if steps:
        now["ema_decay"] = resolve_decay(cfg.ema_decay, steps)
    # settings that cannot change a run with these others: how often samples mix and when mixing
    # stops, without mixing (the draws are the same: pipeline.ops.params.draw_params); the EMA
    # decay without an EMA teacher
    inert = set()
    if run.get("mix") == now["mix"] == "none":
        inert |= {"mix_prob", "mix_on_epoch", "mix_off_epoch"}
    if run.get("teacher") != "ema" and now["teacher"] != "ema":
        inert.add("ema_decay")
    run = {**_ADDED_LATER, **run}
    differ = []
    for key, value in now.items():
        if key in _NOT_SETTINGS or key in inert:
            continue
        if key not in run:
            differ.append(f"{key}: not recorded")
        elif run[key] != value:
            differ.append(f"{key}: run {run[key]!r}, now {value!r}")
    return differ


def _run_in_process(argv: list[str], log: Path, threads: int, teacher_buffers: str | None = None) -> str | None:
    """The same run through click's parser and trainer.loop.train in this process;
    `teacher_buffers` overrides the EMA teacher's BatchNorm-statistics mode for the run."""
    torch.set_num_threads(threads)
    saved = EMATeacher.default_buffers
    EMATeacher.default_buffers = teacher_buffers or saved
    try:
        values = settings_from_argv(argv)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            train(make_config(None, values), explicit=set(values))
    except CnmError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- a crashed run marks its row failed; the ablation goes on
        return f"{type(e).__name__}: {e}"
    finally:
        EMATeacher.default_buffers = saved
    return None


def run_one(args, name: str, flags: tuple[str, ...], seed: int) -> RunResult:
    """One (row, seed) run; a run that already finished (metrics for every epoch) is reused with
    --reuse when its settings are the row's (`settings_differ`), and always with --collect (which
    trains nothing and notes the differences on stderr)."""
    out = Path(args.out) / f"{name}-s{seed}"
    t0 = time.perf_counter()
    argv = train_args(args, flags, seed, out)
    if args.reuse or args.collect:
        try:
            metrics = read_metrics(out, args.epochs, mix_off_epoch(args))
            differ = settings_differ(out, argv)
            if args.collect or not differ:
                if differ:      # --collect tabulates what is there, and says what differs
                    print(f"note: {out} was trained with other settings: {'; '.join(differ)}", file=sys.stderr)
                return RunResult(name, seed, str(out), True, 0.0, metrics)
            print(f"{out}: trained with other settings ({'; '.join(differ)}); training it again",
                  file=sys.stderr)
        except CnmError as e:
            if args.collect:
                return RunResult(name, seed, str(out), False, 0.0, error=f"not run ({e})")
    try:
        # the run's own lock, held while its old files go: a run still training there (another
        # ablation, a `cnm train` by hand) keeps them, and this run fails with its one line
        with RunLock(out):
            for n in ("metrics.jsonl", "config.json", "last.pt", "best.pt", "train.log"):
                (out / n).unlink(missing_ok=True)    # a fresh run in the same place
    except CnmError as e:
        return RunResult(name, seed, str(out), False, 0.0, error=str(e))
    if args.in_process:
        error = _run_in_process(argv, out / "train.log", args.threads, args.teacher_buffers)
    else:
        error = _run_subprocess(argv, out / "train.log", args.threads)
    seconds = time.perf_counter() - t0
    if error is None:
        try:
            return RunResult(name, seed, str(out), True, seconds, read_metrics(out, args.epochs, mix_off_epoch(args)))
        except CnmError as e:
            error = str(e)
    return RunResult(name, seed, str(out), False, seconds, error=error)


def aggregate(results: list[RunResult], rows: list[str], seeds: int) -> list[dict]:
    """Per row: runs finished, mean/spread of every metric over the finished runs, errors."""
    out = []
    for name in rows:
        rs = [r for r in results if r.row == name]
        ok = [r for r in rs if r.ok]
        not_run = [r for r in rs if not r.ok and (r.error or "").startswith("not run")]
        entry = {"row": name, "label": {n: lab for n, lab, _ in ROWS}[name],
                 "flags": " ".join({n: f for n, _, f in ROWS}[name]) or "(defaults)",
                 "runs": len(ok), "seeds": seeds, "not_run": len(not_run),
                 "failed": len(ok) + len(not_run) < seeds,
                 "errors": [f"seed {r.seed}: {r.error}" for r in rs if not r.ok],
                 "seed_list": [r.seed for r in ok],     # the seeds of every metric's "values"
                 "seconds_per_run": statistics.fmean(r.seconds for r in ok) if ok else None}
        for m in METRICS:
            ms = mean_spread([r.metrics.get(m) for r in ok])
            entry[m] = None if ms is None else {"mean": ms[0], "std": ms[1],
                                                "values": [r.metrics.get(m) for r in ok]}
        out.append(entry)
    return out


def _cell(x: dict | None) -> str:
    """`mean ± std`; one run has no spread, so its cell is the value alone."""
    if x is None:
        return "-"
    one = sum(v is not None for v in x["values"]) == 1
    return f"{x['mean']:.2f}" if one else f"{x['mean']:.2f} ± {x['std']:.2f}"


def _paired_delta(t: dict, base: dict) -> str:
    """Mean over the seeds both rows finished of (row - independent) peer-ensemble final, the
    seeds named when they are not all of both rows' (a row short of seeds is compared with the
    same seeds of independent peers, not with their mean over others)."""
    mine = dict(zip(t["seed_list"], t["ens_final"]["values"]))
    theirs = dict(zip(base["seed_list"], base["ens_final"]["values"]))
    common = [s for s in mine if s in theirs and mine[s] is not None and theirs[s] is not None]
    if not common:
        return "-"
    d = f"{statistics.fmean(mine[s] - theirs[s] for s in common):+.2f}"
    if len(common) == len(mine) == len(theirs):
        return d
    return d + f" (seed{'s' if len(common) > 1 else ''} {', '.join(map(str, common))})"


def markdown(table: list[dict], mix_off: int | None = None) -> str:
    """The markdown table: one line per row, mean ± std of the accuracies in %, and the paired
    difference to independent peers. `mix_off`: the epoch where the budget's mixing stops, which
    heads the teacher-ensemble column read there (`mix_off_epoch`)."""
    base = next((t for t in table if t["row"] == "independent" and t["ens_final"]), None)
    at = "mix-off (none)" if mix_off is None else f"epoch {mix_off} (mix-off)"
    lines = [("| row | flags | runs | peer-ens final | peer-ens best | teacher-ens final | teacher-ens best "
              f"| teacher-ens at {at} | mean peer final | peer disagreement final "
              "| Δ peer-ens final vs independent | s/run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        runs = (f"{t['runs']}/{t['seeds']}" + (" **failed**" if t["failed"] else "")
                + (f" ({t['not_run']} not run)" if t["not_run"] else ""))
        delta = "-" if base is None or t["ens_final"] is None else _paired_delta(t, base)
        secs = "-" if t["seconds_per_run"] is None else f"{t['seconds_per_run']:.0f}"
        lines.append(f"| {t['label']} | `{t['flags']}` | {runs} | {_cell(t['ens_final'])} | "
                     f"{_cell(t['ens_best'])} | {_cell(t['teacher_final'])} | {_cell(t['teacher_best'])} | "
                     f"{_cell(t['teacher_at_mix_off'])} | {_cell(t['peer_final'])} | "
                     f"{_cell(t['disagreement'])} | {delta} | {secs} |")
    errors = [f"- {t['row']} {e}" for t in table for e in t["errors"]]
    if errors:
        lines += ["", "Runs that failed or were not run:", *errors]
    return "\n".join(lines) + "\n"


def describe_data(data: str | os.PathLike) -> str:
    """`DIR (dataset, counts, classes)`, with the `cnm prepare` command that recreates a
    synthetic set."""
    from pipeline.data.manifest import load_manifest

    man = load_manifest(data)
    text = (f"{data} ({man.dataset}, {man.counts.get('train')} train / {man.counts.get('test')} test images, "
            f"{man.num_classes} classes)")
    src = man.source or {}
    if src.get("kind") == "synthetic":
        text += (f"; recreate with `cnm prepare --dataset synthetic --num-classes {src['num_classes']} "
                 f"--train-size {src['train_size']} --test-size {src['test_size']} --seed {src['seed']}"
                 + "".join(f" --{k.replace('_', '-')} {src[k]}" for k in ("difficulty", "object_scale") if k in src)
                 + f" --out {data}`")
    return text


def header(args, argv: list[str], wall_s: float) -> str:
    git = git_info(REPO_ROOT) or {}
    commit, dirty = git.get("commit"), git.get("dirty")
    load = load_average()
    rampup = args.rampup_epochs if args.rampup_epochs is not None else round(args.epochs * RAMPUP_FRACTION, 2)
    mixing = ("as the extra flags set" if any(f in args.extra for f in ("--mix-on-epoch", "--mix-off-epoch"))
              else f"off from epoch {resolve_mix_off('auto', args.epochs)} (auto)")
    return "\n".join([
        f"# Ablation: {args.epochs} epochs, {args.seeds} seeds",
        "",
        f"- command: `python -m bench.ablation {shlex.join(argv)}`",
        f"- commit: {commit or 'unknown'}{' (uncommitted changes)' if dirty else ''}",
        (f"- machine: {cpu_model() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
         f"{args.jobs if not args.in_process else 1} run(s) at a time, {args.threads} thread(s) each, "
         f"python {platform.python_version()}, load average at the end {load}"),
        f"- finished: {_dt.datetime.now().isoformat(timespec='seconds')}, wall time {wall_s / 60:.1f} min"
        + (" (--collect: tabulated from finished runs, trained by earlier commands)" if args.collect else ""),
        f"- data: {describe_data(args.data)}"
        + (f", first {args.limit_train} training images" if args.limit_train else ""),
        (f"- settings: {args.peers} x {args.arch}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} "
         f"{args.schedule}, ramp-up {rampup} epochs, mixing {mixing}, seeds 0..{args.seeds - 1}, "
         f"extra flags: "
         f"{args.extra or 'none'}; every other setting is cnm's default (see each RUN/config.json)"),
        f"- EMA teacher BatchNorm statistics: {args.teacher_buffers or 'ema (default)'}",
        ("- accuracies: test top-1 in %, mean ± sample std over the seeds that finished; peer-ens: the "
         "peers' probability-averaged ensemble; teacher-ens: the EMA teachers' (only rows with an EMA "
         "teacher); final = last epoch, best = best epoch, at mix-off = after the epoch where the "
         "mixing rows stop mixing (every row read there; - where that epoch was not evaluated); peer "
         "disagreement: % of test images on which two peers' top-1 predictions differ, mean over "
         "the pairs (the ensemble can gain over its peers only there)"),
        "", ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset (e.g. `cnm prepare --dataset synthetic "
                   "--difficulty 0.4 --train-size 256 --test-size 200 --out data/synthetic-hard-0.4`)")
    p.add_argument("--out", default="runs/ablation", help="directory of the runs (ROW-sSEED each)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of every run")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--rows", default=",".join(ROW_NAMES), help="comma list of rows to run")
    p.add_argument("--arch", default="resnet20", help="peer architecture")
    p.add_argument("--peers", type=int, default=2, help="number of peers")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--lr", type=float, default=0.0125, help="initial lr (CIFAR's 0.1 per 128 images)")
    p.add_argument("--schedule", default="cosine", choices=("step", "cosine"), help="lr schedule")
    p.add_argument("--rampup-epochs", type=float, default=None,
                   help=f"KD/FML ramp-up [default: epochs x 80/300 = {RAMPUP_FRACTION:.3f} x epochs]")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N images")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="training device")
    p.add_argument("--extra", default="", help="more `cnm train` flags for every run (one string)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--in-process", action="store_true", help="run in this process, one at a time")
    p.add_argument("--teacher-buffers", default=None, choices=("ema", "copy"),
                   help="the EMA teacher's BatchNorm statistics: averaged (ema, cnm's default) or the "
                        "live peers' (copy); needs --in-process")
    p.add_argument("--reuse", action="store_true",
                   help="reuse runs in --out that finished every epoch with the same settings (others train again)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the runs in --out that finished (the others are marked)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    p.add_argument("--save", default=None, metavar="FILE.md", help="also write the table with its header")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown or not rows:
        raise CnmError(f"--rows: unknown row(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ROW_NAMES)}")
    if args.epochs < 1 or args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        raise CnmError("--epochs, --seeds, --jobs and --threads must be >= 1")
    if args.teacher_buffers is not None and not args.in_process:
        raise CnmError("--teacher-buffers needs --in-process (it is not a `cnm train` flag)")
    if not Path(args.data).is_dir():
        raise CnmError(f"--data {args.data}: not a directory (prepare it with `cnm prepare`)")
    args.row_list = rows
    return args


def run_ablation(args) -> tuple[list[dict], float]:
    """Every (row, seed) run of `args`; returns (aggregated table, wall seconds)."""
    t0 = time.perf_counter()
    flags = {n: f for n, _, f in ROWS}
    todo = [(name, seed) for seed in range(args.seeds) for name in args.row_list]
    if args.in_process or args.jobs == 1:
        results = [run_one(args, n, flags[n], s) for n, s in todo]
    else:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda ns: run_one(args, ns[0], flags[ns[0]], ns[1]), todo))
    return aggregate(results, args.row_list, args.seeds), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        table, wall = run_ablation(args)
        text = markdown(table, mix_off_epoch(args))
        if args.save:
            atomic_write_text(Path(args.save), header(args, argv, wall) + text)
    except CnmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "mix_off_epoch": mix_off_epoch(args),
                          "wall_s": wall, "rows": table}, indent=2, allow_nan=False))
    else:
        print(text, end="")
    return 1 if any(t["runs"] == 0 for t in table) else 0


if __name__ == "__main__":
    sys.exit(main())
