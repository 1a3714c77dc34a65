"""The training loop of `cnm train` (docs/design.md#the-loop), timm-style:

    train: decide the run (rank 0: --resume, run directory) -> check the data -> build_run
           (trainer/run.py) -> resume -> for each epoch: train_one_epoch, validate, save -> summary

An epoch: order from (seed, e), augmentation from (seed, e, rank, step), lr per step from the
schedule, ramp w(e); no host sync until `read_metrics` at its end (a non-finite loss stops the
run there); then (every --eval-every epochs and the last) every peer, the ensemble and the
EMA teacher are evaluated (else the accuracies are null), RUN/last.pt (and best.pt) written
atomically and verified (trainer/checkpoint.py), and only then one row (`ROW_COLUMNS`) appended
to RUN/metrics.jsonl. Rank 0 holds the directory's lock throughout; SIGTERM/Ctrl-C stop at a
step's end (docs/cli.md#the-run-directory). A resumed run repeats exactly what the uninterrupted run
would have done (tests/trainer/test_resume.py); rows after the checkpoint's epoch are dropped.
Several processes (docs/distributed.md): rank 0 decides and alone writes and prints; every rank
checks its data, starts from rank 0's weights, EMA and momentum, averages gradients through the
step's hook, and evaluates with rank 0's BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from pipeline.data.manifest import load_manifest
from pipeline.errors import CnmError
from trainer import checkpoint as ckpt
from trainer import tblog
from trainer.config import TrainConfig, make_config, resolve
from trainer.distributed import Comm
from trainer.losses import rampup
from trainer.progress import Progress
from trainer.run import Run, build_run, decide_run
from trainer.rundir import LOCK, RunLock, clean_litter
from trainer.schedule import lr_at
from trainer.signals import Stop, graceful_stop, resume_hint
from trainer.teacher import teacher_warning

# The columns of a metrics row, in the order written: epoch (finished epochs, 1-based), lr (at the
# epoch's first step), ramp w(e), loss (per step, summed over peers), ce / kd / fml (per step,
# mean over peers, unweighted), train_acc [P] (lam-weighted, augmented views), test_acc [P],
# ensemble_acc, teacher_acc [P] / teacher_ensemble_acc (None without an EMA teacher),
# disagreement (% of test images two peers predict differently, mean over pairs; None for one peer),
# images_per_s and epoch_s (the training part, device synchronised at its end), eval_s, global_step.
ROW_COLUMNS = ("epoch", "lr", "ramp", "loss", "ce", "kd", "fml", "train_acc", "test_acc", "ensemble_acc",
               "teacher_acc", "teacher_ensemble_acc", "disagreement", "images_per_s", "epoch_s", "eval_s",
               "global_step")


def rampup_weight(epoch: int, rampup_epochs: float) -> float:
    """w(e) = exp(-5 (1 - min(e/R, 1))^2) (docs/design.md#losses); 1 when R = 0."""
    if rampup_epochs <= 0:
        return 1.0
    return float(rampup(epoch, rampup_epochs))


# ----------------------------------------------------------------------------- the data


def _check_data(cfg: TrainConfig):
    """The manifest, its splits, and every train and test label in [0, num_classes), before any
    step (a bad label is then one line, not a device-side assert or a wrong test accuracy)."""
    man = load_manifest(cfg.data)
    for split in ("train", "test"):
        if split not in man.counts:
            raise CnmError(f"{man.root}: the prepared dataset has no {split} split")
        man.check_labels(split)
    return man


def _check_data_everywhere(cfg: TrainConfig, comm: Comm):
    """`_check_data` on every process; a fault on any process (or data that differ from rank
    0's) stops all of them with the same line."""
    manifest = comm.everywhere(lambda: _check_data(cfg), "checking the data")
    if comm.world > 1:
        mine = ckpt.data_fingerprint(manifest)
        comm.agree(None if comm.broadcast_object(mine) == mine else
                   f"its data {manifest.root} differ from rank 0's (manifest checksums); every process "
                   f"must read the same prepared dataset", "checking the data")
    return manifest


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, *, explicit: set[str] | None = None, comm: Comm | None = None,
          console=None, command: str | None = None) -> dict:
    """Run (or resume) a training run; returns {"run", "epochs", "last", "best", "rows"}.
    `command`: the command line recorded in RUN/config.json.

    Rank 0 holds the run directory's lock (trainer/rundir.py) from before it reads the
    directory to the end; in one process SIGTERM/SIGINT stop the run at the end of a step
    (trainer/signals.py: exit 143/130 with the resume command)."""
    comm = comm or Comm()
    with contextlib.ExitStack() as held:
        cfg, meta, state = _decide(cfg, explicit, comm, held)
        manifest = _check_data_everywhere(cfg, comm)
        meta = _check_resumed_data(cfg, meta, manifest, explicit)
        run = build_run(cfg, comm, manifest)
        held.callback(run.loader.close)
        start_epoch, rows, best = resume(run, state, meta)
        del state                                  # its tensors are in the models now
        tb = tblog.for_run(run) if comm.is_main and cfg.log == "tensorboard" else None
        if tb is not None:
            held.callback(tb.close)
        if comm.is_main:
            config = ckpt.write_run_config(run, command)
            if tb is not None:
                tb.hparams(config)
        progress = Progress(epochs=cfg.epochs, quiet=cfg.quiet, enabled=comm.is_main, console=console)
        done = start_epoch
        def where() -> str:
            line = resume_hint(run.dir, done, cfg.epochs)
            if (meta is not None and done == start_epoch and meta.get("epochs") not in (None, cfg.epochs)
                    and line.endswith("--resume")):
                line += f" --epochs {cfg.epochs}"   # last.pt still holds the old number
            return line

        # one process: SIGTERM/Ctrl-C stop after the current step. Under torchrun the signals keep
        # their default action: torchrun sends SIGTERM when another process failed, and a rank
        # blocked in a collective could not act on a flag (the atomic checkpoints stay intact)
        stopping = graceful_stop(where) if comm.world == 1 else contextlib.nullcontext(None)
        with stopping as stop:
            _announce(run, progress, start_epoch, meta)   # inside: a signal after the banner stops cleanly
            for epoch in range(start_epoch, cfg.epochs):
                m = train_one_epoch(run, epoch, progress, stop)
                if m["bad_step"] >= 0:
                    kept = (f"last good checkpoint {run.dir / ckpt.LAST} (epoch {done})"
                            if done > 0 else "no checkpoint was written")
                    raise CnmError(f"non-finite loss at epoch {epoch + 1}, step {m['bad_step'] + 1}: "
                                   f"stopped; {kept}")
                evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
                row = _metrics_row(m["row"], validate(run) if evaluated else NOT_EVALUATED)
                is_best = evaluated and (best is None or row["ensemble_acc"] > best["ensemble_acc"])
                if is_best:
                    best = {"epoch": row["epoch"], "ensemble_acc": row["ensemble_acc"]}
                if comm.is_main:
                    saved = ckpt.run_state(run, epoch=epoch + 1, global_step=row["global_step"], lr=row["lr"],
                                           row=row, best=best)
                    ckpt.save_epoch(run.dir, saved, is_best)   # first: no row for an epoch not saved
                    ckpt.append_jsonl(run.dir / ckpt.METRICS, row)
                    rows.append(row)
                    if (msg := teacher_warning(rows, run.res.rampup_epochs)) is not None:
                        progress.log(f"warning: {msg}")
                    if tb is not None:
                        tb.epoch(row, run.step.loss_buffer)
                done = epoch + 1
                progress.report(row)
                comm.barrier()
            progress.summary(rows, best, str(run.dir), archs=list(run.res.archs))
    return {"run": str(run.dir), "epochs": cfg.epochs, "last": rows[-1] if rows else None, "best": best,
            "rows": rows}


def _check_resumed_data(cfg: TrainConfig, meta: dict | None, manifest, explicit: set[str] | None):
    """A run resumes on the data it was trained on (the manifest checksums in its checkpoint),
    unless --data is given with --allow-new-data: then its best.pt restarts."""
    if meta is None:
        return meta
    if meta["num_classes"] != manifest.num_classes:
        raise CnmError(f"{cfg.data}: {manifest.num_classes} classes, but the checkpoint was trained on "
                       f"{meta['num_classes']}")
    saved = meta.get("data_sha256")
    if saved is None or saved == ckpt.data_fingerprint(manifest):
        return meta
    if not (cfg.allow_new_data and "data" in (explicit or ())):
        raise CnmError(f"{cfg.data}: these data differ from the ones {cfg.out} was trained on (manifest "
                       f"checksums); to continue the run on them: --resume --data {cfg.data} --allow-new-data "
                       f"(best.pt then restarts)")
    return {**meta, "best": None, "new_data": True}


def _decide(cfg: TrainConfig, explicit: set[str] | None, comm: Comm, held: contextlib.ExitStack):
    """`decide_run` on rank 0, holding the run directory's lock (kept in `held`) and after
    removing the litter of killed writers: (config, checkpoint meta) on every rank, plus the
    checkpoint itself on rank 0 (None elsewhere; its tensors are broadcast once the models exist)."""
    state = None

    def on_rank0():
        nonlocal state
        out = cfg.out
        if out is None and not cfg.resume:         # --resume without --out: decide_run says so
            out = resolve(cfg, world=comm.world).out
        if out is not None:
            _lock(Path(out), held)
            cfg_out = make_config(None, {**cfg.to_dict(), "out": str(out)})
        else:
            cfg_out = cfg
        run_cfg, state = decide_run(cfg_out, explicit, comm.world)
        return run_cfg, ckpt.checkpoint_meta(state)

    run_cfg, meta = comm.on_main(on_rank0, "preparing the run")
    return run_cfg, meta, state


def _lock(run_dir: Path, held: contextlib.ExitStack) -> None:
    """Take RUN/.lock until `held` closes, then remove the temporary files of killed writers.
    Directories this process created that hold only the lock at the end (the run failed before
    writing anything) are removed again."""
    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]   # innermost first
    lock = held.enter_context(RunLock(run_dir))

    def tidy():
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            lock.release()
            (run_dir / LOCK).unlink(missing_ok=True)
            for d in created:
                try:
                    d.rmdir()
                except OSError:                # no longer empty: someone else's now
                    break

    held.callback(tidy)
    removed = clean_litter(run_dir)
    if removed:
        print(f"{run_dir}: removed {len(removed)} temporary file(s) left by a killed run: "
              f"{', '.join(removed)}", flush=True)


def resume(run: Run, state: dict | None, meta: dict | None) -> tuple[int, list[dict], dict | None]:
    """Restore the checkpoint (rank 0 holds `state`) and give every process rank 0's models,
    EMA and momentum; returns (first epoch to run, metrics rows kept, best so far)."""
    comm = run.comm
    if state is not None:
        ckpt.restore_state(run, state, str(run.dir / ckpt.LAST))
    comm.sync_module(run.peers)                    # every rank starts from rank 0's weights
    comm.sync_module(run.teacher.module if run.teacher is not None else None)
    if meta is None:
        if comm.is_main and run.cfg.resume:        # restarted from its config.json: from epoch 0
            ckpt.truncate_metrics(run.dir / ckpt.METRICS, 0)
        return 0, [], None
    comm.broadcast_tensors(run.step.optimizer.bufs)
    run.step.set_global_step(int(meta["global_step"]))
    start_epoch = int(meta["epoch"])
    rows = ckpt.truncate_metrics(run.dir / ckpt.METRICS, start_epoch) if comm.is_main else []
    return start_epoch, rows, meta.get("best")


# the test part of a row of an epoch not evaluated (--eval-every)
NOT_EVALUATED = {"test_acc": None, "ensemble_acc": None, "teacher_acc": None, "teacher_ensemble_acc": None,
                 "disagreement": None, "eval_s": 0.0}


def _resume_message(run_dir, done: int, before: int | None, epochs: int) -> str:
    """What a resumed run will do, in words: continue, extend or shorten, or nothing (complete)."""
    change = ""
    if before is not None and before != epochs:
        change = f"{'extending' if epochs > before else 'shortening'} from {before} to {epochs} epochs; "
    if done >= epochs:
        if done > epochs:
            return (f"{run_dir}: {change}{done} epochs are already done, more than --epochs {epochs}: "
                    f"nothing to train")
        return (f"{run_dir}: {change}the run is complete ({done}/{epochs} epochs); to train longer: "
                f"cnm train --out {run_dir} --resume --epochs N")
    return f"resuming {run_dir}: {change}{done}/{epochs} epochs done, continuing with epoch {done + 1}"


def _metrics_row(train_part: dict, test_part: dict) -> dict:
    both = {**train_part, **test_part}
    return {k: both[k] for k in ROW_COLUMNS}


def _announce(run: Run, progress: Progress, start_epoch: int, meta: dict | None) -> None:
    cfg, res, comm, loader = run.cfg, run.res, run.comm, run.loader
    if meta is None:
        what = (f"restarting {run.dir} from epoch 1 with its saved settings (it had no checkpoint)"
                if cfg.resume else f"run {run.dir}")
        progress.log(f"{what}: {len(res.archs)} x {','.join(dict.fromkeys(res.archs))} ({res.peer_exec}) "
                     f"on {res.device}; data {cfg.data} ({run.manifest.dataset}, {run.num_classes} classes), "
                     f"{loader.num_samples * comm.world} train images/epoch via {loader.name}; {cfg.epochs} epochs")
    else:
        progress.log(_resume_message(run.dir, start_epoch, meta.get("epochs"), cfg.epochs))
        if meta.get("new_data"):
            progress.log(f"{run.dir}: continuing on other data ({cfg.data}, --allow-new-data): best.pt "
                         f"restarts from the next epoch")
    if comm.world > 1:
        progress.log(f"{comm.world} processes ({comm.backend}), {cfg.batch_size} images per process and "
                     f"step (global batch {cfg.batch_size * comm.world})"
                     + (", synchronised BatchNorm" if cfg.sync_bn else ""))


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(run: Run, epoch: int, progress: Progress, stop: Stop | None = None) -> dict:
    """The training steps of `epoch` (no host sync until its end). Returns the step's
    `read_metrics` (summed over processes) plus "row": the epoch's training columns. A stop
    signal (`stop`, one process only) ends the epoch after the current step (Interrupted)."""
    cfg, comm, loader, step = run.cfg, run.comm, run.loader, run.step
    steps_per_epoch = len(loader)
    fault = comm.fault_injector()                  # CNM_FAULT testing hook (None normally)
    ramp = rampup_weight(epoch, run.res.rampup_epochs)
    loader.set_epoch(epoch)
    step.reset_metrics()
    step.set_ramp(ramp)
    progress.start_epoch(epoch, steps_per_epoch, cfg.batch_size * comm.world, step.device)
    t0 = time.perf_counter()
    try:
        for i, batch in enumerate(loader):
            if fault is not None:
                fault.check(epoch, i)
            step.set_lr(lr_at(cfg.schedule, cfg.lr, cfg.epochs, epoch, i, steps_per_epoch))
            step(*batch, epoch=epoch, step=i)
            progress.step(i, step.loss_sums[0], step.steps_done)
            if stop is not None:
                stop.check()                   # a Python flag: no host sync
        m = step.read_metrics(comm)            # the epoch's one host sync (summed over ranks)
    finally:
        progress.end_epoch()
    epoch_s = time.perf_counter() - t0
    m["row"] = {"epoch": epoch + 1, "lr": lr_at(cfg.schedule, cfg.lr, cfg.epochs, epoch, 0, steps_per_epoch),
                "ramp": ramp, "loss": m["loss"], "ce": m["ce"], "kd": m["kd"], "fml": m["fml"],
                "train_acc": m["train_acc"],
                "images_per_s": m["steps"] * cfg.batch_size * comm.world / max(epoch_s, 1e-9),
                "epoch_s": epoch_s, "global_step": m["global_step"]}
    return m


def validate(run: Run) -> dict:
    """Test accuracy of every peer, the ensemble and the EMA teacher: the metrics row's
    test_acc, ensemble_acc, teacher_acc, teacher_ensemble_acc (None without a teacher), disagreement,
    eval_s.
    Rank 0's BatchNorm statistics are first given to every rank (DDP's broadcast_buffers), so
    the ranks' models are identical again."""
    teacher = run.teacher.module if run.teacher is not None else None
    run.comm.sync_buffers(run.peers)
    run.comm.sync_buffers(teacher)
    t0 = time.perf_counter()
    acc = run.evaluator(run.step.peerset, teacher)
    return {"test_acc": acc["test_acc"], "ensemble_acc": acc["ensemble_acc"],
            "teacher_acc": acc.get("teacher_acc"), "teacher_ensemble_acc": acc.get("teacher_ensemble_acc"),
            "disagreement": acc["disagreement"], "eval_s": time.perf_counter() - t0}
