"""Building a training run: the `Run` of `cnm train` (config, comm, directory, data, models, step).

`decide_run` (rank 0) applies --resume and picks the run directory; `build_run` (every rank)
builds the peers, the EMA teacher, the Cut^nMix op, the train loader (once: `auto` resolved
first, then with the host augment if that is the cpu loader), the evaluator and the `TrainStep`
(with the gradient all-reduce as its hook when there are several processes). Checkpoint
restoring and the epochs are in trainer/loop.py and trainer/checkpoint.py
(docs/design.md#the-loop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import CnmError
from pipeline.loaders import choose_auto, make_loader
from pipeline.loaders.base import BatchLoader
from pipeline.ops import CutNMix
from trainer import checkpoint as ckpt
from trainer.config import FIELDS, Resolved, TrainConfig, latest_run, make_config, resolve
from trainer.distributed import Comm, convert_sync_batchnorm
from trainer.evaluate import Evaluator
from trainer.peers import PeerSet, build_peers
from trainer.step import LossSetup, TrainStep, build_augment
from trainer.teacher import EMATeacher, resolve_decay


@dataclass
class Run:
    """Everything one training run uses (built by `build_run`)."""

    cfg: TrainConfig
    res: Resolved                 # the config's `auto`s resolved for this machine
    comm: Comm
    dir: Path                     # the run directory (--out)
    manifest: object              # pipeline.data.manifest.Manifest of --data
    peers: PeerSet
    teacher: EMATeacher | None
    augment: CutNMix
    loader: BatchLoader
    evaluator: Evaluator
    step: TrainStep

    @property
    def ema_decay(self) -> float:
        """--ema-decay as resolved for this run's steps per epoch (recorded in config.json)."""
        return resolve_decay(self.cfg.ema_decay, len(self.loader))

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes


def prepare_run(cfg: TrainConfig, explicit: set[str] | None = None) -> tuple[TrainConfig, dict | None]:
    """Apply --resume: (config to run, checkpoint state or None). One-line errors."""
    if not cfg.resume:
        return cfg, None
    if cfg.out is None:
        latest = latest_run(checkpoint=ckpt.LAST)
        raise CnmError("--resume needs --out RUN (the run directory to continue)"
                       + (f"; the most recent run is {latest}: --resume --out {latest}" if latest else ""))
    run = Path(cfg.out)
    last = run / ckpt.LAST
    if not last.is_file():
        if not (run / ckpt.CONFIG).is_file():
            raise CnmError(f"{run}: no {ckpt.LAST} to resume from (the run has not finished an epoch, "
                           f"or --out is wrong)")
        # stopped before its first checkpoint: start it again from epoch 0 with its saved settings
        return _merge(cfg, explicit, _saved_config(run / ckpt.CONFIG), None), None
    state = ckpt.load_checkpoint(last)
    # the settings as requested (with their `auto`s), so a run resumes with the same intent on
    # another machine; config.json keeps what they resolved to
    return _merge(cfg, explicit, dict(state.get("requested") or state["config"]), len(state["archs"])), state


def _saved_config(path: Path) -> dict:
    """The TrainConfig fields of a run's config.json (one line if it is unreadable)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CnmError(f"{path}: cannot read the run's settings ({e.__class__.__name__})") from None
    if not isinstance(saved, dict):
        raise CnmError(f"{path}: not a run's config.json")
    return {k: v for k, v in saved.items() if k in FIELDS}


def _merge(cfg: TrainConfig, explicit: set[str] | None, saved: dict, peers: int | None) -> TrainConfig:
    """The saved settings with the flags given now on top (--arch and --peers must match)."""
    explicit = set(explicit or ())
    if "arch" in explicit and cfg.arch != saved.get("arch"):
        raise CnmError(f"--arch {cfg.arch} does not match the checkpoint's {saved.get('arch')}")
    peers = peers if peers is not None else saved.get("peers")
    if "peers" in explicit and cfg.peers is not None and peers is not None and cfg.peers != peers:
        raise CnmError(f"--peers {cfg.peers} does not match the checkpoint's {peers}")
    merged = dict(saved)
    for k in explicit:
        merged[k] = getattr(cfg, k)
    merged.update(out=str(cfg.out), resume=True, quiet=cfg.quiet, allow_new_data=cfg.allow_new_data)
    return make_config(merged)


def decide_run(cfg: TrainConfig, explicit: set[str] | None, world: int) -> tuple[TrainConfig, dict | None]:
    """Rank 0: the config to run (its `out` set to the run directory) and the checkpoint to
    resume from (None for a new run). A new run into a directory holding one is refused."""
    run_cfg, state = prepare_run(cfg, explicit)
    out = resolve(run_cfg, world=world).out
    run = Path(out)
    if not run_cfg.resume and run.exists() and any(
            (run / n).exists() for n in (ckpt.LAST, ckpt.METRICS, ckpt.CONFIG)):
        raise CnmError(f"{run}: already holds a run; pass --resume to continue it, or another --out")
    return make_config(None, {**run_cfg.to_dict(), "out": out}), state


def build_peers_for(cfg: TrainConfig, res: Resolved, comm: Comm, num_classes: int,
                    device: torch.device) -> PeerSet:
    """The live peers on `device` (channels-last, synchronised BatchNorm as configured), in
    train mode. Not yet synchronised over processes (`trainer.loop.resume` does that)."""
    torch.manual_seed(cfg.seed)
    peers = build_peers(list(res.archs), num_classes, peer_exec=res.peer_exec)
    if cfg.fml and len(set(peers.feature_dims)) > 1:
        raise CnmError(f"--arch {cfg.arch}: feature sizes {peers.feature_dims} differ, so feature-level "
                       f"mutual learning is undefined; pass --no-fml")
    peers = peers.to(device)
    if res.channels_last:
        peers = peers.to(memory_format=torch.channels_last)
    if cfg.sync_bn and comm.world > 1:
        peers = convert_sync_batchnorm(peers, device.type)
    peers.train()
    return peers


def build_teacher(cfg: TrainConfig, peers: PeerSet, steps_per_epoch: int) -> EMATeacher | None:
    """The EMA teacher of `--teacher ema` (None otherwise); built after the loader because
    `--ema-decay auto` is a horizon in epochs (docs/design.md#the-teacher)."""
    if cfg.teacher != "ema":
        return None
    return EMATeacher(peers, decay=resolve_decay(cfg.ema_decay, steps_per_epoch))


def build_train_loader(cfg: TrainConfig, res: Resolved, comm: Comm, device: torch.device,
                       augment: CutNMix) -> BatchLoader:
    """The train loader, built once: `auto` resolved first; the cpu loader augments on the host
    (with the step's op and seeds), the others yield raw batches."""
    name = cfg.loader
    if name == "auto":
        name, _reason = choose_auto(cfg.data, "train", device)
    host = ({"augment": augment, "mix_off_epoch": res.mix_off_epoch, "mix_on_epoch": int(cfg.mix_on_epoch)}
            if name == "cpu" else {})
    return make_loader(name, cfg.data, split="train", batch_size=cfg.batch_size, device=device,
                       seed=cfg.seed, rank=comm.rank, world=comm.world, limit=cfg.limit_train, **host)


def build_run(cfg: TrainConfig, comm: Comm, manifest) -> Run:
    """Every part of a run on this process (see the module docstring)."""
    res = comm.everywhere(lambda: resolve(cfg, world=comm.world), "resolving the config")
    device = comm.everywhere(lambda: comm.device(res.device), "choosing the device")
    peers = build_peers_for(cfg, res, comm, manifest.num_classes, device)
    augment = build_augment(cfg.mix, len(res.archs), alpha=cfg.alpha, mix_prob=cfg.mix_prob,
                            mean=manifest.mean, std=manifest.std,
                            out_dtype=torch.bfloat16 if res.bf16 else torch.float32)
    loader = build_train_loader(cfg, res, comm, device, augment)
    teacher = build_teacher(cfg, peers, len(loader))
    evaluator = Evaluator.from_manifest(manifest, device=device, bf16=res.bf16,
                                        channels_last=res.channels_last, rank=comm.rank,
                                        world=comm.world, reduce=comm.all_reduce_sum)
    step = TrainStep(peers, teacher, augment,
                     losses=LossSetup(teacher=cfg.teacher, fml=cfg.fml, kd_weight=cfg.kd_weight,
                                      fml_weight=cfg.fml_weight, temperature=cfg.temperature,
                                      align_views=cfg.align_views, mix_target=cfg.mix_target),
                     lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                     weight_decay=cfg.weight_decay, device=device, bf16=res.bf16,
                     channels_last=res.channels_last, cuda_graphs=res.cuda_graphs, seed=cfg.seed,
                     rank=comm.rank, host_augment=loader.augment is not None,
                     mix_off_epoch=res.mix_off_epoch, mix_on_epoch=int(cfg.mix_on_epoch))
    step.grad_hook = comm.grad_all_reduce(step.optimizer.params)   # None for one process
    return Run(cfg, res, comm, Path(res.out), manifest, peers, teacher, augment, loader, evaluator, step)
