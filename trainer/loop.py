"""The training loop of `cnm train`: epochs, schedule, evaluation, metrics, checkpoints, resume.

    for epoch e (0-based):
        loader.set_epoch(e)                     order from (seed, e)
        w = rampup(e, rampup_epochs); per step: lr from the schedule (trainer.schedule)
        TrainStep per batch                     augment from (seed, e, rank, step); no host sync
        read the epoch's device metrics once    a non-finite loss stops the run here
        evaluate every peer, the peer ensemble, every EMA peer, the EMA ensemble on the test split
        append one row to RUN/metrics.jsonl, then write RUN/last.pt (and RUN/best.pt) atomically

A metrics row: epoch (1-based count of finished epochs), lr (at the epoch's first step),
ramp (w(e)), loss (total per step, summed over peers), ce / kd / fml (per step, mean over
peers, unweighted), train_acc [P] (lam-weighted, on the augmented views), test_acc [P],
ensemble_acc, teacher_acc [P] and teacher_ensemble_acc (null without an EMA teacher),
images_per_s and epoch_s (training part of the epoch, device synchronised at its end), eval_s,
global_step.

Resume (`--resume --out RUN`): the run's saved config is the base and flags given explicitly
override it (e.g. `--epochs 400` extends a run); `--arch`/`--peers` must match the checkpoint.
Models, EMA, momentum, the global step and the epoch come from RUN/last.pt; the data order and
the augmentation are pure functions of (seed, epoch, rank, step), so the resumed run repeats
exactly what the uninterrupted run would have done (tests/trainer/test_resume.py). Rows of
metrics.jsonl after the checkpoint's epoch (written before a crash) are dropped and recomputed.

Processes (torchrun, trainer/distributed.py): `comm` is the single-process `Comm` by default;
`cnm train` under torchrun passes a `ProcessGroupComm`. Then rank 0 alone reads the checkpoint
and decides the settings and the run directory (every rank runs rank 0's settings; its errors
reach every rank), every rank checks its data (and that all read the same files), rank 0's weights, EMA and momentum are broadcast,
gradients are averaged after every backward (`GradAllReduce` as the step's gradient hook),
`--sync-bn` converts BatchNorm, the epoch's metrics and test counts are summed over ranks,
rank 0's BatchNorm buffers are broadcast before evaluation, and only rank 0 writes
config.json, metrics.jsonl and checkpoints, and prints. Checkpoints do not depend on the number
of processes, so a run resumes with any number (README).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline.errors import CnmError
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig, make_config, resolve, resolved_dict
from trainer.distributed import Comm
from trainer.schedule import lr_at
from trainer.teacher import teacher_warning

# ----------------------------------------------------------------------------- helpers


def rampup_weight(epoch: int, rampup_epochs: float) -> float:
    """w(e) = exp(-5 (1 - min(e/R, 1))^2) (DESIGN.md); 1 when R = 0."""
    if rampup_epochs <= 0:
        return 1.0
    from trainer.losses import rampup

    return float(rampup(epoch, rampup_epochs))


def momentum_to_peer_dicts(peerset, optimizer) -> list[OrderedDict]:
    """SGD momentum buffers as P per-peer state-dict-shaped dicts (param name -> tensor), split
    like `peer_state_dicts`, so a checkpoint does not depend on --peer-exec."""
    from trainer.peers import split_state_dict

    by_param = {id(p): b for p, b in zip(optimizer.params, optimizer.bufs)}
    named = {n: by_param[id(p)].detach().cpu().clone() for n, p in peerset.named_parameters()}
    if peerset.peer_exec == "grouped":
        return split_state_dict({n[len("net."):]: t for n, t in named.items()}, peerset.peers)
    out = [OrderedDict() for _ in range(peerset.peers)]
    for n, t in named.items():
        _, k, rest = n.split(".", 2)          # "models.<k>.<name>"
        out[int(k)][rest] = t
    return out


def load_momentum(peerset, optimizer, states) -> None:
    """Inverse of `momentum_to_peer_dicts` (copies into the existing buffers in place)."""
    from trainer.peers import merge_state_dicts

    if peerset.peer_exec == "grouped":
        merged = {"net." + n: t for n, t in merge_state_dicts(states).items()}
    else:
        merged = {f"models.{k}.{n}": t for k, s in enumerate(states) for n, t in s.items()}
    by_param = {id(p): b for p, b in zip(optimizer.params, optimizer.bufs)}
    with torch.no_grad():
        for n, p in peerset.named_parameters():
            if n not in merged or merged[n].shape != p.shape:
                raise CnmError(f"checkpoint momentum does not fit parameter {n}")
            by_param[id(p)].copy_(merged[n])


def _limit_loader(loader, n: int) -> None:
    """Restrict a loader to the first n samples of its split (--limit-train).

    The resident and cpu loaders read their epoch order from `loader.plan` when an epoch starts,
    so re-planning them over n samples is exact; dali and ffcv build their pipelines up front.
    """
    from pipeline.loaders.base import make_plan

    if loader.name not in ("resident", "cpu"):
        raise CnmError(f"--limit-train works with --loader resident or cpu, not {loader.name}")
    p = loader.plan
    loader.plan = make_plan(min(n, p.n), split="train", batch_size=p.batch_size, seed=p.seed,
                            rank=p.rank, world=p.world, drop_last=None)


def _check_data(cfg: TrainConfig):
    from pipeline.data.manifest import load_manifest

    man = load_manifest(cfg.data)
    for split in ("train", "test"):
        if split not in man.counts:
            raise CnmError(f"{man.root}: the prepared dataset has no {split} split")
    return man


def _data_fingerprint(man) -> str:
    """The manifest checksums of the train and test arrays (every process must read the same
    data; the optional .beton files are copies of them and may exist on some nodes only)."""
    import hashlib

    from pipeline.data.manifest import images_file, labels_file

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


# ----------------------------------------------------------------------------- run set-up


def prepare_run(cfg: TrainConfig, explicit: set[str] | None = None) -> tuple[TrainConfig, dict | None]:
    """Apply --resume: (config to run, checkpoint state or None). One-line errors."""
    if not cfg.resume:
        return cfg, None
    if cfg.out is None:
        raise CnmError("--resume needs --out RUN (the run directory to continue)")
    run = Path(cfg.out)
    last = run / ckpt.LAST
    if not last.is_file():
        raise CnmError(f"{run}: no {ckpt.LAST} to resume from (the run has not finished an epoch, "
                       f"or --out is wrong)")
    state = ckpt.load_checkpoint(last)
    # the settings as requested (with their `auto`s), so a run resumes with the same intent on
    # another machine; config.json keeps what they resolved to
    saved = dict(state.get("requested") or state["config"])
    explicit = set(explicit or ())
    if "arch" in explicit and cfg.arch != saved["arch"]:
        raise CnmError(f"--arch {cfg.arch} does not match the checkpoint's {saved['arch']}")
    if "peers" in explicit and cfg.peers is not None and cfg.peers != len(state["archs"]):
        raise CnmError(f"--peers {cfg.peers} does not match the checkpoint's {len(state['archs'])}")
    merged = {k: v for k, v in saved.items()}
    for k in explicit:
        merged[k] = getattr(cfg, k)
    merged.update(out=str(run), resume=True, quiet=cfg.quiet)
    return make_config(merged), state


def train(cfg: TrainConfig, *, explicit: set[str] | None = None, comm: Comm | None = None,
          console=None) -> dict:
    """Run (or resume) a training run; returns {"run", "epochs", "last", "best"}."""
    from pipeline.loaders import make_loader
    from trainer.evaluate import Evaluator
    from trainer.peers import build_peers
    from trainer.progress import Progress
    from trainer.step import LossSetup, TrainStep, build_augment
    from trainer.teacher import EMATeacher, resolve_decay

    comm = comm or Comm()
    loaded: dict = {}

    def decide_run():
        """Rank 0: the config to run, the run directory, and what the other ranks need to know
        of the checkpoint (the tensors themselves are broadcast once the models exist)."""
        run_cfg, state = prepare_run(cfg, explicit)
        out = resolve(run_cfg, world=comm.world).out
        run = Path(out)
        if state is None and run.exists() and any(
                (run / n).exists() for n in (ckpt.LAST, ckpt.METRICS, ckpt.CONFIG)):
            raise CnmError(f"{run}: already holds a run; pass --resume to continue it, or another --out")
        loaded["state"] = state
        meta = None if state is None else {k: state.get(k) for k in ("num_classes", "epoch", "global_step",
                                                                     "best")}
        return run_cfg, out, meta

    cfg, out, meta = comm.on_main(decide_run, "preparing the run")
    cfg = dataclasses.replace(cfg, out=out)
    state = loaded.get("state")          # the checkpoint: on rank 0 only
    res = comm.everywhere(lambda: resolve(cfg, world=comm.world), "resolving the config")
    run = Path(res.out)
    manifest = _check_data_everywhere(cfg, comm)
    K = manifest.num_classes
    if meta is not None and meta["num_classes"] != K:
        raise CnmError(f"{cfg.data}: {K} classes, but the checkpoint was trained on {meta['num_classes']}")
    device = comm.everywhere(lambda: comm.device(res.device), "choosing the device")
    P = len(res.archs)

    # ---- models, teacher, augmentation, data
    torch.manual_seed(cfg.seed)
    peerset = build_peers(list(res.archs), K, peer_exec=res.peer_exec)
    if cfg.fml and len(set(peerset.feature_dims)) > 1:
        raise CnmError(f"--arch {cfg.arch}: feature sizes {peerset.feature_dims} differ, so feature-level "
                       f"mutual learning is undefined; pass --no-fml")
    if state is not None:
        peerset.load_peer_state_dicts(state["peers"])
    peerset = peerset.to(device)
    if res.channels_last:
        peerset = peerset.to(memory_format=torch.channels_last)
    if cfg.sync_bn and comm.world > 1:
        from trainer.distributed import convert_sync_batchnorm

        peerset = convert_sync_batchnorm(peerset, device.type)
    peerset.train()
    comm.sync_module(peerset)                      # every rank starts from rank 0's weights
    teacher = EMATeacher(peerset) if cfg.teacher == "ema" else None    # decay set once the steps are known
    if teacher is not None and state is not None and state.get("teacher") is not None:
        teacher.module.load_peer_state_dicts(state["teacher"])
    if teacher is not None:
        comm.sync_module(teacher.module)
    compute_dtype = torch.bfloat16 if res.bf16 else torch.float32
    aug = build_augment(cfg.mix, P, alpha=cfg.alpha, mix_prob=cfg.mix_prob, mean=manifest.mean,
                        std=manifest.std, out_dtype=compute_dtype)
    loader_name = cfg.loader
    loader = make_loader(loader_name, cfg.data, split="train", batch_size=cfg.batch_size, device=device,
                         seed=cfg.seed, rank=comm.rank, world=comm.world,
                         augment=aug if loader_name == "cpu" else None)
    if cfg.limit_train is not None:
        _limit_loader(loader, cfg.limit_train)
    host_augment = loader.name == "cpu"
    if host_augment and loader.augment is None:  # "auto" picked the cpu loader: rebuild with augment
        loader.close()
        loader = make_loader("cpu", cfg.data, split="train", batch_size=cfg.batch_size, device=device,
                             seed=cfg.seed, rank=comm.rank, world=comm.world, augment=aug)
        if cfg.limit_train is not None:
            _limit_loader(loader, cfg.limit_train)
    steps_per_epoch = len(loader)
    ema_decay = resolve_decay(cfg.ema_decay, steps_per_epoch)
    if teacher is not None:
        teacher.decay = ema_decay
    evaluator = Evaluator.from_manifest(manifest, device=device, bf16=res.bf16,
                                        channels_last=res.channels_last, rank=comm.rank,
                                        world=comm.world, reduce=comm.all_reduce_sum)
    step = TrainStep(peerset, teacher, aug,
                     losses=LossSetup(teacher=cfg.teacher, fml=cfg.fml, kd_weight=cfg.kd_weight,
                                      fml_weight=cfg.fml_weight, temperature=cfg.temperature),
                     lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                     weight_decay=cfg.weight_decay, device=device, bf16=res.bf16,
                     channels_last=res.channels_last, cuda_graphs=res.cuda_graphs, seed=cfg.seed,
                     rank=comm.rank)
    step.grad_hook = comm.grad_all_reduce(step.optimizer.params)   # None for one process

    # ---- run directory
    config_out = resolved_dict(cfg, res, ema_decay=ema_decay)
    config_out["_resolved"] = {"loader": loader.name, "num_classes": K, "dataset": manifest.dataset,
                               "train_images": loader.num_samples * comm.world,
                               "steps_per_epoch": steps_per_epoch, "ema_decay": ema_decay, "world": comm.world,
                               "backend": comm.backend,
                               "torch": torch.__version__, "python": platform.python_version(),
                               "hostname": platform.node()}
    start_epoch, rows, best = 0, [], None
    if meta is not None:
        if state is not None:
            load_momentum(peerset, step.optimizer, state["optimizer"]["momentum"])
        comm.broadcast_tensors(step.optimizer.bufs)
        step.set_global_step(int(meta["global_step"]))
        start_epoch = int(meta["epoch"])
        best = meta.get("best")
        if comm.is_main:
            rows = ckpt.truncate_metrics(run / ckpt.METRICS, start_epoch)
    state = None                                   # the checkpoint's tensors are in the models now
    loaded.clear()
    if comm.is_main:
        run.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(run / ckpt.CONFIG, config_out)
    config_saved = {k: v for k, v in config_out.items() if k != "_resolved"}
    requested = {**cfg.to_dict(), "out": str(run), "resume": False}

    progress = Progress(epochs=cfg.epochs, quiet=cfg.quiet, enabled=comm.is_main, console=console)
    if meta is None:
        progress.log(f"run {run}: {P} x {','.join(dict.fromkeys(res.archs))} ({res.peer_exec}) on "
                     f"{res.device}, {loader.num_samples * comm.world} train images/epoch via "
                     f"{loader.name}, {cfg.epochs} epochs")
    else:
        progress.log(f"resuming {run} at epoch {start_epoch + 1}/{cfg.epochs}")
    if comm.world > 1:
        progress.log(f"{comm.world} processes ({comm.backend}), {cfg.batch_size} images per process and "
                     f"step (global batch {cfg.batch_size * comm.world})"
                     + (", synchronised BatchNorm" if cfg.sync_bn else ""))

    try:
        rows, best = _epochs(cfg, res, comm, run, loader, step, evaluator, teacher, peerset, progress,
                             start_epoch, rows, best, config_saved, requested, K)
    finally:
        loader.close()
    progress.summary(rows, best, str(run), archs=list(res.archs))
    return {"run": str(run), "epochs": cfg.epochs, "last": rows[-1] if rows else None, "best": best,
            "rows": rows}


def _epochs(cfg, res, comm, run, loader, step, evaluator, teacher, peerset, progress, start_epoch,
            rows, best, config_saved, requested, K):
    """The epochs of a run (see the module docstring); returns (metrics rows, best)."""
    device = step.device
    host_augment = loader.name == "cpu"
    steps_per_epoch = len(loader)
    fault = comm.fault_injector()                  # CNM_FAULT testing hook (None normally)
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        step.reset_metrics()
        step.set_ramp(rampup_weight(epoch, cfg.rampup_epochs))
        lr0 = lr_at(cfg.schedule, cfg.lr, cfg.epochs, epoch, 0, steps_per_epoch)
        progress.start_epoch(epoch, steps_per_epoch, cfg.batch_size * comm.world, device)
        t0 = time.perf_counter()
        try:
            for i, batch in enumerate(loader):
                if fault is not None:
                    fault.check(epoch, i)
                step.set_lr(lr_at(cfg.schedule, cfg.lr, cfg.epochs, epoch, i, steps_per_epoch))
                if host_augment:
                    step.run_views(*batch)
                else:
                    step(batch[0], batch[1], epoch=epoch, step=i)
                progress.step(i, step.loss_sums[0], step.steps_done)
            m = step.read_metrics(comm)        # the epoch's one host sync (summed over ranks)
        finally:
            progress.end_epoch()
        epoch_s = time.perf_counter() - t0
        if m["bad_step"] >= 0:
            kept = (f"last good checkpoint {run / ckpt.LAST} (epoch {start_epoch if not rows else rows[-1]['epoch']})"
                    if (run / ckpt.LAST).exists() else "no checkpoint was written")
            raise CnmError(f"non-finite loss at epoch {epoch + 1}, step {m['bad_step'] + 1}: stopped; {kept}")
        # per-rank BatchNorm: evaluate and save rank 0's running statistics on every rank (DDP's
        # broadcast_buffers), so the ranks' models are identical again
        comm.sync_buffers(step.peerset)
        comm.sync_buffers(teacher.module if teacher is not None else None)
        t1 = time.perf_counter()
        acc = evaluator(step.peerset, teacher.module if teacher is not None else None)
        eval_s = time.perf_counter() - t1
        row = {"epoch": epoch + 1, "lr": lr0, "ramp": rampup_weight(epoch, cfg.rampup_epochs),
               "loss": m["loss"], "ce": m["ce"], "kd": m["kd"], "fml": m["fml"],
               "train_acc": m["train_acc"], "test_acc": acc["test_acc"],
               "ensemble_acc": acc["ensemble_acc"],
               "teacher_acc": acc.get("teacher_acc"),
               "teacher_ensemble_acc": acc.get("teacher_ensemble_acc"),
               "images_per_s": m["steps"] * cfg.batch_size * comm.world / max(epoch_s, 1e-9),
               "epoch_s": epoch_s, "eval_s": eval_s, "global_step": m["global_step"]}
        is_best = best is None or row["ensemble_acc"] > best["ensemble_acc"]
        if is_best:
            best = {"epoch": row["epoch"], "ensemble_acc": row["ensemble_acc"]}
        if comm.is_main:
            rows.append(row)
            ckpt.append_jsonl(run / ckpt.METRICS, row)
            if (msg := teacher_warning(rows, cfg.rampup_epochs)) is not None:
                progress.log(f"warning: {msg}")
            payload = {
                "format": ckpt.CHECKPOINT_FORMAT, "config": config_saved, "requested": requested,
                "epoch": epoch + 1,
                "global_step": m["global_step"], "archs": list(res.archs), "num_classes": K,
                "peers": peerset.peer_state_dicts(),
                "teacher": teacher.module.peer_state_dicts() if teacher is not None else None,
                "optimizer": {"momentum": momentum_to_peer_dicts(peerset, step.optimizer)},
                "schedule": {"name": cfg.schedule, "lr0": cfg.lr, "epochs": cfg.epochs, "lr": lr0},
                "rng": {"torch_cpu": torch.get_rng_state()},
                "metrics": row, "best": best, "world": comm.world,
            }
            payload = _to_cpu(payload)
            ckpt.save_checkpoint(run / ckpt.LAST, payload)
            if is_best:
                ckpt.save_checkpoint(run / ckpt.BEST, payload)
        progress.report(row)
        comm.barrier()
    return rows, best


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items()) if isinstance(obj, OrderedDict) \
            else {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
