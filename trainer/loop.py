"""The training loop of `cnm train` (docs/design.md#the-loop), timm-style:

    train: decide the run (rank 0: --resume, run directory) -> check the data -> build_run
           (trainer/run.py) -> resume -> for each epoch: train_one_epoch, validate, save -> summary

An epoch: order from (seed, e), augmentation from (seed, e, rank, step), lr per step from the
schedule, ramp w(e); no host sync until `read_metrics` at its end (a non-finite loss stops the
run there); then (every --eval-every epochs and the last) every peer, the ensemble and the
EMA teacher are evaluated (else the accuracies are null), one row (`ROW_COLUMNS`) is appended
to RUN/metrics.jsonl and RUN/last.pt (and best.pt) written atomically (trainer/checkpoint.py). A resumed run repeats exactly what the uninterrupted run
would have done (tests/trainer/test_resume.py); rows after the checkpoint's epoch are dropped.
Several processes (docs/distributed.md): rank 0 decides and alone writes and prints; every rank
checks its data, starts from rank 0's weights, EMA and momentum, averages gradients through the
step's hook, and evaluates with rank 0's BatchNorm statistics.
"""

from __future__ import annotations

import hashlib
import time

from pipeline.data.manifest import images_file, labels_file, load_manifest
from pipeline.errors import CnmError
from trainer import checkpoint as ckpt
from trainer import tblog
from trainer.config import TrainConfig
from trainer.distributed import Comm
from trainer.losses import rampup
from trainer.progress import Progress
from trainer.run import Run, build_run, decide_run
from trainer.schedule import lr_at

# The columns of a metrics row, in the order written: epoch (finished epochs, 1-based), lr (at the
# epoch's first step), ramp w(e), loss (per step, summed over peers), ce / kd / fml (per step,
# mean over peers, unweighted), train_acc [P] (lam-weighted, augmented views), test_acc [P],
# ensemble_acc, teacher_acc [P] / teacher_ensemble_acc (None without an EMA teacher),
# images_per_s and epoch_s (the training part, device synchronised at its end), eval_s, global_step.
ROW_COLUMNS = ("epoch", "lr", "ramp", "loss", "ce", "kd", "fml", "train_acc", "test_acc", "ensemble_acc",
               "teacher_acc", "teacher_ensemble_acc", "images_per_s", "epoch_s", "eval_s", "global_step")


def rampup_weight(epoch: int, rampup_epochs: float) -> float:
    """w(e) = exp(-5 (1 - min(e/R, 1))^2) (docs/design.md#losses); 1 when R = 0."""
    if rampup_epochs <= 0:
        return 1.0
    return float(rampup(epoch, rampup_epochs))


# ----------------------------------------------------------------------------- the data


def _check_data(cfg: TrainConfig):
    man = load_manifest(cfg.data)
    for split in ("train", "test"):
        if split not in man.counts:
            raise CnmError(f"{man.root}: the prepared dataset has no {split} split")
    return man


def _data_fingerprint(man) -> str:
    """The manifest checksums of the train and test arrays (every process must read the same
    data; the optional .beton files are copies of them and may exist on some nodes only)."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        for name in (images_file(split), labels_file(split)):
            h.update(f"{name}={man.files.get(name, {}).get('sha256')};".encode())
    return h.hexdigest()


def _check_data_everywhere(cfg: TrainConfig, comm: Comm):
    """`_check_data` on every process; a fault on any process (or data that differ from rank
    0's) stops all of them with the same line."""
    manifest = comm.everywhere(lambda: _check_data(cfg), "checking the data")
    if comm.world > 1:
        mine = _data_fingerprint(manifest)
        comm.agree(None if comm.broadcast_object(mine) == mine else
                   f"its data {manifest.root} differ from rank 0's (manifest checksums); every process "
                   f"must read the same prepared dataset", "checking the data")
    return manifest


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, *, explicit: set[str] | None = None, comm: Comm | None = None,
          console=None, command: str | None = None) -> dict:
    """Run (or resume) a training run; returns {"run", "epochs", "last", "best", "rows"}.
    `command`: the command line recorded in RUN/config.json."""
    comm = comm or Comm()
    cfg, meta, state = _decide(cfg, explicit, comm)
    manifest = _check_data_everywhere(cfg, comm)
    if meta is not None and meta["num_classes"] != manifest.num_classes:
        raise CnmError(f"{cfg.data}: {manifest.num_classes} classes, but the checkpoint was trained on "
                       f"{meta['num_classes']}")
    run = build_run(cfg, comm, manifest)
    tb = None
    try:
        start_epoch, rows, best = resume(run, state, meta)
        del state                                  # its tensors are in the models now
        tb = tblog.for_run(run) if comm.is_main and cfg.log == "tensorboard" else None
        if comm.is_main:
            config = ckpt.write_run_config(run, command)
            if tb is not None:
                tb.hparams(config)
        progress = Progress(epochs=cfg.epochs, quiet=cfg.quiet, enabled=comm.is_main, console=console)
        _announce(run, progress, start_epoch, resumed=meta is not None)
        for epoch in range(start_epoch, cfg.epochs):
            m = train_one_epoch(run, epoch, progress)
            if m["bad_step"] >= 0:
                kept = (f"last good checkpoint {run.dir / ckpt.LAST} (epoch {rows[-1]['epoch'] if rows else start_epoch})"
                        if (run.dir / ckpt.LAST).exists() else "no checkpoint was written")
                raise CnmError(f"non-finite loss at epoch {epoch + 1}, step {m['bad_step'] + 1}: stopped; {kept}")
            evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            row = _metrics_row(m["row"], validate(run) if evaluated else NOT_EVALUATED)
            is_best = evaluated and (best is None or row["ensemble_acc"] > best["ensemble_acc"])
            if is_best:
                best = {"epoch": row["epoch"], "ensemble_acc": row["ensemble_acc"]}
            if comm.is_main:
                rows.append(row)
                ckpt.append_jsonl(run.dir / ckpt.METRICS, row)
                if tb is not None:
                    tb.epoch(row, run.step.loss_buffer)
                saved = ckpt.run_state(run, epoch=epoch + 1, global_step=row["global_step"], lr=row["lr"],
                                       row=row, best=best)
                ckpt.save_epoch(run.dir, saved, is_best)
            progress.report(row)
            comm.barrier()
    finally:
        run.loader.close()
        if tb is not None:
            tb.close()
    progress.summary(rows, best, str(run.dir), archs=list(run.res.archs))
    return {"run": str(run.dir), "epochs": cfg.epochs, "last": rows[-1] if rows else None, "best": best,
            "rows": rows}


def _decide(cfg: TrainConfig, explicit: set[str] | None, comm: Comm):
    """`decide_run` on rank 0: (config, checkpoint meta) on every rank, plus the checkpoint
    itself on rank 0 (None elsewhere; its tensors are broadcast once the models exist)."""
    state = None

    def on_rank0():
        nonlocal state
        run_cfg, state = decide_run(cfg, explicit, comm.world)
        return run_cfg, ckpt.checkpoint_meta(state)

    run_cfg, meta = comm.on_main(on_rank0, "preparing the run")
    return run_cfg, meta, state


def resume(run: Run, state: dict | None, meta: dict | None) -> tuple[int, list[dict], dict | None]:
    """Restore the checkpoint (rank 0 holds `state`) and give every process rank 0's models,
    EMA and momentum; returns (first epoch to run, metrics rows kept, best so far)."""
    comm = run.comm
    if state is not None:
        ckpt.restore_state(run, state)
    comm.sync_module(run.peers)                    # every rank starts from rank 0's weights
    comm.sync_module(run.teacher.module if run.teacher is not None else None)
    if meta is None:
        return 0, [], None
    comm.broadcast_tensors(run.step.optimizer.bufs)
    run.step.set_global_step(int(meta["global_step"]))
    start_epoch = int(meta["epoch"])
    rows = ckpt.truncate_metrics(run.dir / ckpt.METRICS, start_epoch) if comm.is_main else []
    return start_epoch, rows, meta.get("best")


# the test part of a row of an epoch not evaluated (--eval-every)
NOT_EVALUATED = {"test_acc": None, "ensemble_acc": None, "teacher_acc": None, "teacher_ensemble_acc": None,
                 "eval_s": 0.0}


def _metrics_row(train_part: dict, test_part: dict) -> dict:
    both = {**train_part, **test_part}
    return {k: both[k] for k in ROW_COLUMNS}


def _announce(run: Run, progress: Progress, start_epoch: int, resumed: bool) -> None:
    cfg, res, comm, loader = run.cfg, run.res, run.comm, run.loader
    if not resumed:
        progress.log(f"run {run.dir}: {len(res.archs)} x {','.join(dict.fromkeys(res.archs))} ({res.peer_exec}) "
                     f"on {res.device}; data {cfg.data} ({run.manifest.dataset}, {run.num_classes} classes), "
                     f"{loader.num_samples * comm.world} train images/epoch via {loader.name}; {cfg.epochs} epochs")
    else:
        progress.log(f"resuming {run.dir} at epoch {start_epoch + 1}/{cfg.epochs}")
    if comm.world > 1:
        progress.log(f"{comm.world} processes ({comm.backend}), {cfg.batch_size} images per process and "
                     f"step (global batch {cfg.batch_size * comm.world})"
                     + (", synchronised BatchNorm" if cfg.sync_bn else ""))


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(run: Run, epoch: int, progress: Progress) -> dict:
    """The training steps of `epoch` (no host sync until its end). Returns the step's
    `read_metrics` (summed over processes) plus "row": the epoch's training columns."""
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
    test_acc, ensemble_acc, teacher_acc, teacher_ensemble_acc (None without a teacher), eval_s.
    Rank 0's BatchNorm statistics are first given to every rank (DDP's broadcast_buffers), so
    the ranks' models are identical again."""
    teacher = run.teacher.module if run.teacher is not None else None
    run.comm.sync_buffers(run.peers)
    run.comm.sync_buffers(teacher)
    t0 = time.perf_counter()
    acc = run.evaluator(run.step.peerset, teacher)
    return {"test_acc": acc["test_acc"], "ensemble_acc": acc["ensemble_acc"],
            "teacher_acc": acc.get("teacher_acc"), "teacher_ensemble_acc": acc.get("teacher_ensemble_acc"),
            "eval_s": time.perf_counter() - t0}
