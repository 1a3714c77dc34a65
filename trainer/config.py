"""`TrainConfig`: every setting of `cnm train`, one typed dataclass, one CLI flag per field.

The defaults are the online-distillation recipe (docs/design.md#the-recipe: the CIFAR recipe shared by ONE,
OKDDip and PCL): 300 epochs, batch 128, SGD momentum 0.9 nesterov, lr 0.1 divided by 10 at 50%
and 75% of training, weight decay 5e-4, KD temperature 3, consistency ramp-up over 80 of 300 epochs,
EMA teacher decay auto (a 2.56-epoch horizon: 0.999 at 391 steps/epoch), Cut^nMix with Beta(1, 1)
and mixing probability 0.5.

Every field maps to exactly one flag of `cnm train` (`--field-name`, booleans as
`--name/--no-name`); `tests/trainer/test_config.py` checks the mapping both ways. Precedence:
dataclass defaults < `--config FILE.toml` (or a run's `config.json`, whose record, `out` and
`resume` are ignored: it repeats that run in a new directory) < flags given on the command
line. Unknown keys in a config file fail with one line.

Settings whose best value depends on the machine are `"auto"` here and are resolved once by
`resolve()` (which is what `RUN/config.json` records):

- `device`       auto -> cuda when torch sees a GPU, else cpu.
- `peer_exec`    auto -> grouped on CUDA when every peer has the same architecture (one network,
                 groups=P convolutions: fewer, larger kernels), loop otherwise (on CPU the
                 grouped convolution has no advantage and `loop` is the reference).
- `bf16`, `channels_last`, `cuda_graphs`   auto -> on for CUDA, off for CPU.
- `loader`       auto -> decided by `pipeline.loaders.make_loader("auto", ...)`.
- `out`          None -> `runs/<arch>-p<P>-<YYYYmmdd-HHMMSS>`.
- `rampup_epochs` auto -> 80/300 of --epochs (the recipe's 80 of 300).
- `mix_off_epoch` auto -> 2/5 of --epochs, rounded up (the rest of the run trains unmixed).
- `ema_decay`    auto -> `1 - 1/(2.56 * steps_per_epoch)` (`trainer.teacher.resolve_decay`), once
                 the loader knows the steps per epoch; config.json records the number.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import tomllib

from pipeline.errors import CnmError

MIX_MODES = ("cutnmix", "cutmix", "mixup", "none")
TEACHERS = ("ema", "peers", "none")
MIX_TARGETS = ("area", "teacher")
PEER_EXECS = ("auto", "loop", "grouped")
LOADERS = ("auto", "ffcv", "dali", "resident", "cpu")
DEVICES = ("auto", "cuda", "cpu")
SCHEDULES = ("step", "cosine")
SWITCH = ("auto", "on", "off")
LOGS = ("none", "tensorboard")
RUNS_DIR = "runs"  # the default parent of run directories (`resolve`)
# the literature's ramp-up (80 of 300 epochs), scaled to --epochs by `--rampup-epochs auto`
RAMPUP_FRACTION = 80 / 300
# `--mix-off-epoch auto`: mixing stops after this fraction of the epochs (docs/design.md#the-recipe);
# a Fraction, so that 2/5 of 640 is 256 exactly
MIX_OFF_FRACTION = Fraction(2, 5)
# keys of a run's config.json that are bookkeeping, not settings (ignored by `--config`)
RECORD_KEYS = ("_resolved", "_record")
DEFAULT_DATA = "data/cifar100"  # where the README's `cnm prepare ... --out data/cifar100` writes
DEFAULT_PEERS = 3
SEED_LIMIT = 2 ** 63  # seeds are hashed as signed 64-bit integers (pipeline/loaders augment_seed)


def _f(default, help: str, choices: tuple | None = None, **extra):
    """A dataclass field carrying its CLI help text (and choices) as metadata."""
    meta = {"help": help, "choices": choices, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- data and models
    data: str = _f(DEFAULT_DATA, "prepared dataset directory (from `cnm prepare`)")
    arch: str = _f("resnet32", "peer architecture: resnet20, resnet32, resnet56, resnet110, wrn20_8, "
                   "vgg16 or densenet40_12; or a comma list, one per peer, for a mixed ensemble "
                   "(e.g. resnet32,wrn20_8)")
    peers: int | None = _f(None, "number of peers")
    peer_exec: str = _f("auto", "run peers one by one (loop) or as one grouped network; "
                        "auto: grouped on CUDA for a single architecture, else loop", PEER_EXECS)
    # ---- optimisation (SGD, the CIFAR online-KD recipe)
    epochs: int = _f(300, "training epochs")
    batch_size: int = _f(128, "training batch size (per process)")
    lr: float = _f(0.1, "initial learning rate")
    schedule: str = _f("step", "lr schedule: step (x0.1 at 50% and 75% of the epochs) or cosine "
                       "(per step, to 0)", SCHEDULES)
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay (all parameters)")
    # ---- augmentation (docs/design.md#cutnmix-views)
    mix: str = _f("cutnmix", "mixed-sample augmentation", MIX_MODES)
    alpha: float = _f(1.0, "Beta(alpha, alpha) of the mixing ratio")
    mix_prob: float = _f(0.5, "probability that a sample is mixed")
    mix_on_epoch: int = _f(0, "epoch (0-based) from which samples are mixed: the epochs before it train "
                           "on the base views (crop and flip); 0: from the start")
    mix_off_epoch: str | float = _f("auto", "epoch (0-based) from which no sample is mixed: the rest of "
                                    "the run trains on the base views (crop and flip); auto: 2/5 of "
                                    "--epochs, rounded up; --epochs or more: mix throughout",
                                    number_or_auto=True, metavar="E|auto")
    mix_target: str = _f("area", "what teaches a mixed sample: its area label (CutMix's lam-weighted "
                         "cross-entropy), or the EMA teacher's prediction of its view (teacher: "
                         "the area cross-entropy fades out as the KD/FML weight ramps up)", MIX_TARGETS)
    # ---- online distillation (docs/design.md#losses)
    teacher: str = _f("ema", "KD teacher: EMA self-ensemble (ema), detached mean of the live peers "
                      "(peers), or no KD (none)", TEACHERS)
    fml: bool = _f(True, "feature-level mutual learning between peers")
    kd_weight: float = _f(1.0, "weight of the KD term (gamma_kd)")
    fml_weight: float = _f(1.0, "weight of the feature mutual-learning term (gamma_fml)")
    temperature: float = _f(3.0, "KD temperature T")
    align_views: bool = _f(True, "where Cut^nMix shows the peers different content (a mixed sample's "
                           "box at a different place per peer), KD to each peer's own EMA teacher "
                           "on its own view and no FML")
    rampup_epochs: str | float = _f("auto", "epochs over which the KD/FML weight ramps up "
                                    "(exp(-5(1-e/R)^2)); 0 = no ramp; auto: 80/300 of --epochs "
                                    "(the recipe's 80 of 300)", number_or_auto=True, metavar="R|auto")
    ema_decay: str | float = _f("auto", "EMA teacher decay per step, or auto: the decay whose horizon "
                                "1/(1-decay) is 2.56 epochs of this run (0.999 at 391 steps/epoch)",
                                number_or_auto=True, metavar="D|auto")
    # ---- execution
    loader: str = _f("auto", "training data loader", LOADERS)
    device: str = _f("auto", "training device", DEVICES)
    bf16: str = _f("auto", "bf16 autocast (auto: on for CUDA)", SWITCH)
    channels_last: str = _f("auto", "channels-last memory format (auto: on for CUDA)", SWITCH)
    cuda_graphs: str = _f("auto", "capture the whole train step in one CUDA graph "
                          "(auto: on for CUDA)", SWITCH)
    seed: int = _f(0, "random seed (initialisation, data order, augmentation)")
    eval_every: int = _f(1, "evaluate every N epochs (the last epoch always; the others have null "
                         "accuracies in metrics.jsonl and cannot become best.pt)")
    limit_train: int | None = _f(None, "train on the first N training images only (quick runs)")
    # ---- several processes (torchrun; README "Several GPUs, several machines")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics over all processes of a torchrun "
                       "run (SyncBatchNorm; turns CUDA graphs off); default: per-process BatchNorm")
    dist_timeout: float = _f(600.0, "seconds a process of a torchrun run waits for the others "
                             "(forming the group, every collective) before it stops with an error")
    # ---- run directory and output
    out: str | None = _f(None, "run directory")
    resume: bool = _f(False, "continue the run in --out from its last.pt")
    allow_new_data: bool = _f(False, "with --resume and an explicit --data: continue on a dataset whose "
                              "manifest checksums differ from the run's (best.pt then restarts)")
    quiet: bool = _f(False, "plain log lines instead of progress bars")
    log: str = _f("none", "also log to TensorBoard in RUN/tensorboard (the tensorboard extra: "
                  "pip install 'cnm[tensorboard]'); metrics.jsonl is always written", LOGS)
    log_every: int = _f(50, "with --log tensorboard: the training loss as the mean of every N steps")

    # ------------------------------------------------------------------ derived values
    @property
    def archs(self) -> list[str]:
        """One architecture name per peer (length = number of peers)."""
        names = [a.strip() for a in self.arch.split(",") if a.strip()]
        if len(names) == 1:
            return names * (self.peers if self.peers is not None else DEFAULT_PEERS)
        return names

    @property
    def num_peers(self) -> int:
        return len(self.archs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
DEFAULTS: dict[str, Any] = TrainConfig().to_dict()


def flag_name(name: str) -> str:
    """The CLI flag of a field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def field_type(name: str) -> type:
    """The scalar type of a field: bool, int, float or str (Optional stripped)."""
    t = str(FIELDS[name].type)
    for base, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t.split("|")[0].strip() == base:
            return typ
    raise AssertionError(f"unsupported field type {t} for {name}")


def _number_or_auto(name: str, value: Any, where: str | None = None) -> float | str:
    """A field that is `"auto"` or a number (from a file: a number; from a flag: its text)."""
    if value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise CnmError(f"{where + ': ' if where else ''}{flag_name(name)} must be a number or auto, got {value!r}")


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check/convert one value from a config file to the field's type (one-line errors)."""
    if FIELDS[name].metadata.get("number_or_auto"):
        return _number_or_auto(name, value, where)
    typ = field_type(name)
    optional = "None" in str(FIELDS[name].type)
    if value is None:
        if optional:
            return None
        raise CnmError(f"{where}: {name} cannot be null")
    if typ is bool:
        if not isinstance(value, bool):
            raise CnmError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CnmError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CnmError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise CnmError(f"{where}: {name} must be a string, got {value!r}")
    return value


def parse_ema_decay(value: str | float) -> float | None:
    """`--ema-decay`: None for auto, else the number (CnmError unless in [0, 1))."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        decay = float(value)
    except (TypeError, ValueError):
        raise CnmError(f"--ema-decay must be auto or a number in [0, 1), got {value!r}") from None
    if not 0.0 <= decay < 1.0:
        raise CnmError(f"--ema-decay must be auto or a number in [0, 1), got {value!r}")
    return decay


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a TOML file (`key = value`, field names; `-` or `_` both accepted) or a run's
    `config.json`. Unknown keys, wrong types and unreadable files fail with one line."""
    p = Path(path)
    if not p.is_file():
        raise CnmError(f"{p}: config file not found")
    try:
        if p.suffix == ".json":
            raw = json.loads(p.read_text())
        else:
            raw = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError, JSONDecodeError
        raise CnmError(f"{p}: cannot parse config file ({e.__class__.__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CnmError(f"{p}: config file must hold a table of settings")
    if any(k in raw for k in RECORD_KEYS):
        # a run's config.json: its record and resolved facts are not settings, and its `out` /
        # `resume` name that run, so repeating it (`--config RUN/config.json`) starts a new one
        for key in (*RECORD_KEYS, "out", "resume"):
            raw.pop(key, None)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            unknown.append(key)
            continue
        out[name] = _coerce(name, value, str(p))
    if unknown:
        raise CnmError(f"{p}: unknown setting(s) {', '.join(sorted(unknown))} "
                       f"(known: {', '.join(FIELDS)})")
    return out


def command_line(config_file: str | None, given: Mapping[str, Any]) -> str:
    """The `cnm train` command of a config file and the flags given (field -> value), in field
    order, quoted for a POSIX shell: what RUN/config.json records as `_record.command`."""
    words = ["cnm", "train"] + (["--config", str(config_file)] if config_file else [])
    for name in [n for n in FIELDS if n in given]:
        value = given[name]
        if field_type(name) is bool:
            if name in ("resume", "quiet"):
                words += [flag_name(name)] if value else []
            else:
                words.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        else:
            words += [flag_name(name), str(value)]
    return shlex.join(words)


def make_config(file_values: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then a config file's values, then command-line overrides (already typed)."""
    values = dict(DEFAULTS)
    for src in (file_values or {}, overrides or {}):
        for k, v in src.items():
            if k not in FIELDS:
                raise CnmError(f"unknown setting {k!r}")
            values[k] = _number_or_auto(k, v) if FIELDS[k].metadata.get("number_or_auto") else v
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Device-independent checks of a config: one CnmError line for the first fault."""
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            raise CnmError(f"{flag_name(name)} must be one of {', '.join(choices)}, "
                           f"got {getattr(cfg, name)!r}")
    for name, f in FIELDS.items():  # nan and inf pass every range test below, so they are refused first
        value = getattr(cfg, name)
        if f.metadata.get("number_or_auto") and value != "auto" and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CnmError(f"{flag_name(name)} must be a number or auto, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CnmError(f"{flag_name(name)} must be a finite number, got {value}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise CnmError(f"--seed must be an integer in [0, 2**63), got {cfg.seed}")
    names = [a.strip() for a in cfg.arch.split(",")]
    if not all(names):
        raise CnmError(f"--arch {cfg.arch!r}: empty architecture name")
    if cfg.peers is not None and cfg.peers < 1:
        raise CnmError(f"--peers must be >= 1, got {cfg.peers}")
    if len(names) > 1 and cfg.peers is not None and cfg.peers != len(names):
        raise CnmError(f"--arch lists {len(names)} architectures but --peers is {cfg.peers}; "
                       f"drop --peers or list one architecture per peer")
    # mixing stops at this epoch (--mix-off-epoch resolved, or the run's end)
    mix_end = min(resolve_mix_off(cfg.mix_off_epoch, cfg.epochs), cfg.epochs)
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.alpha > 0, f"--alpha must be > 0, got {cfg.alpha}"),
        (0 <= cfg.mix_prob <= 1, f"--mix-prob must be in [0, 1], got {cfg.mix_prob}"),
        (cfg.mix_target == "area" or (cfg.teacher == "ema" and cfg.kd_weight > 0),
         "--mix-target teacher needs an EMA teacher to learn from: --teacher ema and --kd-weight > 0"),
        (cfg.kd_weight >= 0, f"--kd-weight must be >= 0, got {cfg.kd_weight}"),
        (cfg.fml_weight >= 0, f"--fml-weight must be >= 0, got {cfg.fml_weight}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.rampup_epochs == "auto" or cfg.rampup_epochs >= 0,
         f"--rampup-epochs must be >= 0 or auto, got {cfg.rampup_epochs}"),
        (cfg.mix_off_epoch == "auto" or (cfg.mix_off_epoch >= 0 and float(cfg.mix_off_epoch).is_integer()),
         f"--mix-off-epoch must be a whole number >= 0 or auto, got {cfg.mix_off_epoch}"),
        (cfg.mix_on_epoch >= 0, f"--mix-on-epoch must be >= 0, got {cfg.mix_on_epoch}"),
        (cfg.mix == "none" or cfg.mix_on_epoch == 0 or cfg.mix_on_epoch < mix_end,
         (f"--mix-on-epoch {cfg.mix_on_epoch} is not before --mix-off-epoch and --epochs (epoch {mix_end}): "
          "no epoch would mix; to train without mixing pass --mix none")),
        (cfg.eval_every >= 1, f"--eval-every must be >= 1, got {cfg.eval_every}"),
        (cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}"),
        (cfg.ema_decay == "auto" or 0 <= cfg.ema_decay < 1,
         f"--ema-decay must be auto or a number in [0, 1), got {cfg.ema_decay}"),
        (cfg.limit_train is None or cfg.limit_train >= 1,
         f"--limit-train must be >= 1, got {cfg.limit_train}"),
        (cfg.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}"),
        (not (cfg.nesterov and cfg.momentum == 0), "--nesterov needs --momentum > 0"),
        (cfg.resume or not cfg.allow_new_data, "--allow-new-data needs --resume (it continues a run)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CnmError(msg)
    parse_ema_decay(cfg.ema_decay)


@dataclass(frozen=True)
class Resolved:
    """What `auto` became on this machine (recorded in RUN/config.json under `_resolved`)."""

    device: str          # "cuda" | "cpu"
    peer_exec: str       # "loop" | "grouped"
    bf16: bool
    channels_last: bool
    cuda_graphs: bool
    archs: tuple[str, ...]
    out: str
    rampup_epochs: float  # --rampup-epochs auto: RAMPUP_FRACTION * epochs
    mix_off_epoch: int    # --mix-off-epoch auto: ceil(MIX_OFF_FRACTION * epochs)


def _switch(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def resolve(cfg: TrainConfig, *, now: _dt.datetime | None = None, world: int = 1) -> Resolved:
    """Turn every `auto` into a concrete choice for this machine (one-line errors).

    `world`: the number of training processes. With more than one and `--sync-bn`, CUDA graphs
    are off (auto) or refused (on): SyncBatchNorm's collectives sit inside the forward and
    backward, so they would have to be captured in the graph (see trainer/distributed.py)."""
    import torch

    validate(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise CnmError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                       f"{build}); use --device cpu")
    from trainer.models import check_arch

    archs = tuple(cfg.archs)
    for a in dict.fromkeys(archs):
        check_arch(a)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device == "cuda"
    single_arch = len(set(archs)) == 1
    if cfg.peer_exec == "grouped" and not single_arch:
        raise CnmError(f"--peer-exec grouped needs one architecture for all peers, got {cfg.arch}; "
                       f"use --peer-exec loop")
    peer_exec = cfg.peer_exec if cfg.peer_exec != "auto" else (
        "grouped" if on_cuda and single_arch and len(archs) > 1 else "loop")
    sync_bn_collectives = cfg.sync_bn and world > 1
    if sync_bn_collectives and cfg.cuda_graphs == "on":
        raise CnmError("--sync-bn cannot be used with --cuda-graphs on: SyncBatchNorm's collectives "
                       "would have to be captured in the graph; use --cuda-graphs auto or off")
    cuda_graphs = _switch(cfg.cuda_graphs, on_cuda and not sync_bn_collectives)
    if cuda_graphs and not on_cuda:
        raise CnmError("--cuda-graphs on needs --device cuda")
    out = cfg.out
    if out is None:
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        tag = "+".join(dict.fromkeys(archs))
        out = f"{RUNS_DIR}/{tag}-p{len(archs)}-{stamp}"
    return Resolved(device=device, peer_exec=peer_exec, bf16=_switch(cfg.bf16, on_cuda),
                    channels_last=_switch(cfg.channels_last, on_cuda), cuda_graphs=cuda_graphs,
                    archs=archs, out=out, rampup_epochs=resolve_rampup(cfg.rampup_epochs, cfg.epochs),
                    mix_off_epoch=resolve_mix_off(cfg.mix_off_epoch, cfg.epochs))


def resolve_rampup(rampup_epochs: float | str, epochs: int) -> float:
    """`--rampup-epochs`: a number as given; auto: the recipe's 80 of 300 epochs scaled to
    `epochs` (RAMPUP_FRACTION * epochs, e.g. 8.0 for 30 epochs)."""
    return RAMPUP_FRACTION * epochs if rampup_epochs == "auto" else float(rampup_epochs)


def resolve_mix_off(mix_off_epoch: float | str, epochs: int) -> int:
    """`--mix-off-epoch`: a number as given; auto: MIX_OFF_FRACTION of `epochs`, rounded up (so a
    one-epoch run mixes)."""
    return math.ceil(MIX_OFF_FRACTION * epochs) if mix_off_epoch == "auto" else int(mix_off_epoch)


def latest_run(parent: str | os.PathLike = RUNS_DIR, checkpoint: str = "last.pt") -> Path | None:
    """The run directory under `parent` (the default parent of --out) whose `checkpoint` was
    written last, or None when there is none: what `--resume` without `--out` suggests."""
    p = Path(parent)
    found = [c for c in p.glob(f"*/{checkpoint}") if c.is_file()] if p.is_dir() else []
    return max(found, key=lambda c: c.stat().st_mtime).parent if found else None


def resolved_dict(cfg: TrainConfig, res: Resolved, ema_decay: float | None = None) -> dict[str, Any]:
    """The config as written to RUN/config.json: every field with `auto` replaced by its choice,
    so `cnm train --config RUN/config.json` repeats the run on the same kind of machine.
    `ema_decay`: the resolved per-step decay (`trainer.teacher.resolve_decay`), when known."""
    d = cfg.to_dict()
    if ema_decay is not None:
        d["ema_decay"] = ema_decay
    d.update(device=res.device, peer_exec=res.peer_exec, out=res.out,
             bf16="on" if res.bf16 else "off",
             channels_last="on" if res.channels_last else "off",
             cuda_graphs="on" if res.cuda_graphs else "off",
             peers=len(res.archs), resume=False, allow_new_data=False, rampup_epochs=res.rampup_epochs,
             mix_off_epoch=res.mix_off_epoch)
    return d
