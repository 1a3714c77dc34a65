"""Checkpoints and the run directory: atomic writes, one-line errors on bad files.

A run directory (`--out RUN`) holds:

    config.json    the resolved TrainConfig (plus `_resolved`: loader, sizes; `_record`: command,
                   versions, git commit, device, dataset manifest checksum)
    metrics.jsonl  one JSON object per finished epoch
    last.pt        state after the last finished epoch (what `--resume` continues from)
    best.pt        state after the epoch with the best test `ensemble_acc`
    prev.pt        the last.pt before the latest one (kept when it verified)
    eval-NAME.json written by `cnm eval` of NAME.pt (eval-best.json, eval-last.json)
    .lock          held by the running process (trainer/rundir.py)

`last.pt`/`best.pt` are dicts (torch.save, tensors on the CPU):

    format       CHECKPOINT_FORMAT
    config       the resolved config dict (as config.json)
    requested    the config as requested (`auto`s kept): the base of `--resume`
    epoch        number of finished epochs (the next epoch to run, 0-based)
    global_step  optimiser steps done
    archs        [arch per peer]; num_classes
    peers        [state_dict per peer]  (PeerSet.peer_state_dicts(): loop/grouped-agnostic)
    teacher      [state_dict per EMA peer] or None
    optimizer    {"momentum": [state_dict-shaped momentum per peer]}  (same split as `peers`)
    schedule     {"name", "lr0", "epochs", "lr"}
    rng          {"torch_cpu": ByteTensor}  (augmentation and data order are re-derived from
                 (seed, epoch, step), so no device generator state needs saving)
    metrics      the last metrics row; best {"epoch", "ensemble_acc"}
    world        the number of processes that trained it (informative: nothing above depends on
                 it, so a run resumes with any number of processes; trainer/distributed.py)
    data_sha256  the manifest checksums of the train and test arrays it was trained on

Every file is written through pipeline/fileio.py (a temporary sibling, fsync'ed, then
`os.replace`d into place), so a `kill -9` at any moment leaves either the old or the new
complete file; checkpoints carry their sha256 and are verified on every load (trainer/rundir.py). `run_state` builds the
whole state of a `trainer.run.Run`, `restore_state` puts it back, `save_epoch` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline.data.manifest import MANIFEST, images_file, labels_file, sha256_file
from pipeline.environment import run_record
from pipeline.errors import CnmError
from pipeline.fileio import atomic_write_bytes, atomic_write_json, os_error_reason
from trainer.config import resolved_dict
from trainer.optim import load_momentum, momentum_to_peer_dicts
from trainer.rundir import (  # noqa: F401 -- the run's file names, re-exported for the loop and tests
    BEST,
    CONFIG,
    LAST,
    METRICS,
    PREV,
    check_state,
    load_verified,
    require_keys,
    save_verified,
)

CHECKPOINT_FORMAT = 1
EVAL = "eval-{name}.json"   # `cnm eval` of NAME.pt (eval-best.json, eval-last.json, ...)
# keys every resumable checkpoint has (an older or foreign file lacks some: one line, no KeyError)
RESUME_KEYS = ("config", "epoch", "global_step", "archs", "num_classes", "peers", "optimizer.momentum")
EVAL_KEYS = ("epoch", "archs", "num_classes", "peers")


def save_checkpoint(path: str | os.PathLike, state: dict, *, keep: str | None = None) -> None:
    """torch.save `state` atomically, sealed with its sha256 and verified when read back
    (`trainer.rundir.save_verified`; `keep=PREV` keeps the replaced file as prev.pt)."""
    save_verified(path, state, keep=keep)


def load_checkpoint(path: str | os.PathLike, keys: tuple[str, ...] = RESUME_KEYS) -> dict:
    """Verify and read a checkpoint written by `save_checkpoint` (tensors mapped to the CPU).

    A missing, truncated, corrupt (checksum), foreign or incomplete (a key of `keys` missing)
    file is a one-line CnmError naming it (and, for a bad file, the earlier checkpoint to use).
    """
    p = Path(path)
    state = load_verified(p)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CnmError(f"{p}: not a cnm checkpoint (format {CHECKPOINT_FORMAT} expected)")
    require_keys(state, keys, p)
    return state


def eval_path(checkpoint: str | os.PathLike) -> Path:
    """Where `cnm eval` writes the result of `checkpoint`: eval-<its stem>.json beside it."""
    p = Path(checkpoint)
    return p.with_name(EVAL.format(name=p.stem))


def find_checkpoint(run_or_file: str | os.PathLike) -> Path:
    """A checkpoint file from a run directory (best.pt, else last.pt) or a file path."""
    p = Path(run_or_file)
    if p.is_dir():
        for name in (BEST, LAST):
            if (p / name).is_file():
                return p / name
        raise CnmError(f"{p}: no {BEST} or {LAST} in this run directory")
    if not p.exists():
        raise CnmError(f"{p}: no such run directory or checkpoint")
    return p


# ----------------------------------------------------------------------------- metrics.jsonl


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line with a single write + fsync (a kill leaves at most a torn last line,
    which `read_jsonl` drops)."""
    line = (json.dumps(row) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)  # umask applies
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise CnmError(f"{path}: could not append the metrics row ({os_error_reason(e)})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The complete JSON lines of a file (a torn or garbled line is dropped)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_metrics(path: str | os.PathLike, epochs_done: int) -> list[dict]:
    """Keep only the rows of epochs 1..epochs_done (a resumed run re-runs the rest); atomic."""
    rows = [r for r in read_jsonl(path) if isinstance(r.get("epoch"), int) and r["epoch"] <= epochs_done]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


# ----------------------------------------------------------------------------- a run's state


def write_run_config(run, command: str | None = None) -> dict:
    """RUN/config.json: the resolved config of a `trainer.run.Run` plus `_resolved` (what the
    run picked on this machine: loader, sizes, processes) and `_record` (what repeating it
    needs: `pipeline.environment.run_record` with `command`, and the sha256 of the dataset's
    manifest.json). Returns the dict written."""
    comm, loader = run.comm, run.loader
    out = resolved_dict(run.cfg, run.res, ema_decay=run.ema_decay)
    out["_resolved"] = {"loader": loader.name, "num_classes": run.num_classes,
                        "dataset": run.manifest.dataset,
                        "train_images": loader.num_samples * comm.world,
                        "steps_per_epoch": len(loader), "world": comm.world, "backend": comm.backend,
                        "ema_decay": run.ema_decay}
    out["_record"] = {**run_record(run.step.device, command),
                      "manifest_sha256": sha256_file(run.manifest.root / MANIFEST)}
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.dir / CONFIG, out)
    return out


def data_fingerprint(manifest) -> str:
    """The manifest checksums of the train and test arrays (every process must read the same
    data, and a run resumes on the data it was trained on; the optional .beton files are copies
    of them and may exist on some nodes only)."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        for name in (images_file(split), labels_file(split)):
            h.update(f"{name}={manifest.files.get(name, {}).get('sha256')};".encode())
    return h.hexdigest()


def checkpoint_meta(state: dict | None) -> dict | None:
    """What every process needs to know of a checkpoint before its tensors are broadcast."""
    if state is None:
        return None
    meta = {k: state.get(k) for k in ("num_classes", "epoch", "global_step", "best", "data_sha256")}
    meta["epochs"] = (state.get("config") or {}).get("epochs")
    return meta


def run_state(run, *, epoch: int, global_step: int, lr: float, row: dict, best: dict) -> dict:
    """The whole state of a run after `epoch` finished epochs, on the CPU (format above)."""
    cfg, teacher = run.cfg, run.teacher
    return _to_cpu({
        "format": CHECKPOINT_FORMAT, "config": resolved_dict(cfg, run.res, ema_decay=run.ema_decay),
        "requested": {**cfg.to_dict(), "out": str(run.dir), "resume": False, "allow_new_data": False},
        "epoch": epoch, "global_step": global_step, "archs": list(run.res.archs),
        "num_classes": run.num_classes,
        "peers": run.peers.peer_state_dicts(),
        "teacher": teacher.module.peer_state_dicts() if teacher is not None else None,
        "optimizer": {"momentum": momentum_to_peer_dicts(run.peers, run.step.optimizer)},
        "schedule": {"name": cfg.schedule, "lr0": cfg.lr, "epochs": cfg.epochs, "lr": lr},
        "rng": {"torch_cpu": torch.get_rng_state()},
        "metrics": row, "best": best, "world": run.comm.world, "data_sha256": data_fingerprint(run.manifest),
    })


def check_peer_states(peers, states, what: str) -> None:
    """`states` (a checkpoint's per-peer state dicts) fit `peers` (a PeerSet) tensor by tensor,
    else one CnmError line naming `what`, the peer and the first missing or misshapen tensor."""
    mine = peers.peer_state_dicts()
    if not isinstance(states, list) or len(states) != len(mine):
        n = len(states) if isinstance(states, list) else "no list of"
        raise CnmError(f"{what}: {n} peers in the checkpoint, {len(mine)} in the model")
    for k, (expected, got) in enumerate(zip(mine, states)):
        if not isinstance(got, dict):
            raise CnmError(f"{what}: peer {k} is a {type(got).__name__}, not a state dict")
        check_state(expected, got, f"{what}, peer {k}")


def restore_state(run, state: dict, source: str = "the checkpoint") -> None:
    """Load a checkpoint's peers, EMA teacher and momentum into a freshly built run (in place).
    A run resumed with an EMA teacher its checkpoint lacks starts the teacher from the peers.
    A tensor missing or of another shape is one line naming it (`source`: the file)."""
    check_peer_states(run.peers, state["peers"], source)
    run.peers.load_peer_state_dicts(state["peers"])
    if run.teacher is not None:
        teacher = state["teacher"] if state.get("teacher") is not None else state["peers"]
        check_peer_states(run.teacher.module, teacher, f"{source} (EMA teacher)")
        run.teacher.module.load_peer_state_dicts(teacher)
    load_momentum(run.peers, run.step.optimizer, state["optimizer"]["momentum"])


def save_epoch(run_dir: Path, state: dict, is_best: bool) -> None:
    """Write RUN/last.pt (the one it replaces kept as RUN/prev.pt) and RUN/best.pt when this
    epoch is the best so far; each verified before it replaces the old file."""
    save_checkpoint(run_dir / LAST, state, keep=PREV)
    if is_best:
        save_checkpoint(run_dir / BEST, state)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
