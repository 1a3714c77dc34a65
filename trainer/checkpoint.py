"""Checkpoints and the run directory: atomic writes, one-line errors on bad files.

A run directory (`--out RUN`) holds:

    config.json    the resolved TrainConfig (plus `_resolved`: loader, torch version, ...)
    metrics.jsonl  one JSON object per finished epoch
    last.pt        state after the last finished epoch (what `--resume` continues from)
    best.pt        state after the epoch with the best test `ensemble_acc`
    eval.json      written by `cnm eval`

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

Every file is written to a temporary sibling, fsync'ed, then `os.replace`d into place, so a
`kill -9` at any moment leaves either the old or the new complete file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CnmError

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save `state` atomically (serialised in memory first, then one write)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by `save_checkpoint` (tensors mapped to the CPU).

    A missing, truncated or foreign file is a one-line CnmError.
    """
    p = Path(path)
    if not p.is_file():
        raise CnmError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated zip, pickle of an unknown class, ...
        raise CnmError(f"{p}: not a readable cnm checkpoint ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CnmError(f"{p}: not a cnm checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


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
