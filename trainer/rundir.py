"""The run directory's safety: one process per directory, no litter, verified checkpoints.

- `RunLock(run)`: an exclusive `fcntl.flock` on `RUN/.lock` for the whole run (the OS releases
  it when the process dies, however it dies); a second process gets one line naming the holder.
- `clean_litter(run)`: removes the temporary files of writers killed mid-write.
- `save_verified` / `load_verified`: a checkpoint carries a sha256 of its content, is read back
  and verified before it replaces `last.pt`, the replaced one is kept as `prev.pt`, and every
  load verifies it (a corrupt file is one line that names the earlier checkpoint to use).
- `require_keys`, `check_state`, `load_state_checked`: an older or foreign file, or a model of
  another shape, is one line, never a KeyError or a size-mismatch traceback.
See docs/design.md#the-run-directory.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import struct
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import torch

from pipeline.errors import CnmError
from pipeline.fileio import (
    atomic_write_bytes,
    host_tag,
    os_error_reason,
    pid_alive,
    remove_stale_temps,
    temp_path,
)
from trainer.checkpoint import BEST, CONFIG, LAST, METRICS

LOCK = ".lock"
PREV = "prev.pt"
CHECKSUM_KEY = "sha256"
# temporary names of the project's earlier writer (tempfile.mkstemp: no host or PID in them)
_LEGACY_NAMES = "|".join(re.escape(n) for n in (LAST, BEST, PREV, CONFIG, METRICS))
_LEGACY_TEMP = re.compile(rf"^\.(?:{_LEGACY_NAMES})\.tmp-[a-z0-9_]{{8}}$")


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive, non-blocking lock on a run directory (`RUN/.lock`), held until `release()`
    or the end of the process. Under torchrun, rank 0 holds it.

    The lock file records {"host", "pid", "since"} of the holder; a second `acquire()` (another
    process, or another RunLock in this one) raises one CnmError line naming them. The lock is
    an flock on an open file description: processes forked while it is held (loader workers)
    share it, so it is free once the holder and its children have ended.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> Self:
        """Take the lock (creating RUN/ if needed) or raise CnmError at once."""
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise CnmError(f"{self.path}: cannot create the run lock ({os_error_reason(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CnmError(f"{self.run_dir}: in use by another cnm process ({holder}); wait for it "
                           f"to end, or choose another --out") from None
        except OSError as e:
            os.close(fd)
            raise CnmError(f"{self.path}: cannot lock the run directory ({os_error_reason(e)})") from None
        record = json.dumps({"host": host_tag(), "pid": os.getpid(),
                             "since": _dt.datetime.now().isoformat(timespec="seconds")}) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            os.fsync(fd)
        except OSError:
            pass  # the lock holds without its note; a second process is then told "unknown"
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking it would let two processes lock two inodes)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'host H, PID P, since T' from a lock file, with a note when the PID no longer runs."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        host, pid, since = str(info["host"]), int(info["pid"]), str(info["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"
    text = f"host {host}, PID {pid}, since {since}"
    if host == host_tag() and not pid_alive(pid):
        text += "; that PID no longer runs, so a child process of it still holds the lock"
    return text


# ----------------------------------------------------------------------------- litter


def clean_litter(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary files a killed writer left in `run_dir`; returns their names.

    Call it holding the run's `RunLock`. Removed: `.NAME.tmp-HOST-PID-XXXXXXXX` files of this
    host whose PID no longer runs, and the earlier writer's `.NAME.tmp-XXXXXXXX` files of the
    run's own files (last.pt, best.pt, prev.pt, config.json, metrics.jsonl), which no other
    process writes while the lock is held. A live process's files are never touched.
    """
    removed = remove_stale_temps(run_dir)
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return removed
    for entry in entries:
        if _LEGACY_TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


# ----------------------------------------------------------------------------- checksums


def content_sha256(obj: Any) -> str:
    """sha256 of a checkpoint's content: a type-tagged, length-prefixed walk of nested dicts
    (in order), lists, tuples, str, bytes, int, float, bool, None and CPU tensors (dtype, shape
    and the bytes of their values). Independent of how torch.save lays the file out."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    def tag(t: bytes, payload: bytes = b"") -> None:
        h.update(t + struct.pack("<Q", len(payload)) + payload)

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        tag(b"T", f"{t.dtype}{tuple(obj.shape)}".encode())
        values = t.view(torch.uint8).numpy()  # a view of the tensor's bytes, no copy
        h.update(b"V" + struct.pack("<Q", values.nbytes))
        h.update(values)
    elif isinstance(obj, Mapping):
        tag(b"D", str(len(obj)).encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        tag(b"L" if isinstance(obj, list) else b"U", str(len(obj)).encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, bool):
        tag(b"B", repr(obj).encode())
    elif isinstance(obj, int):
        tag(b"I", str(obj).encode())
    elif isinstance(obj, float):
        tag(b"F", obj.hex().encode())
    elif isinstance(obj, str):
        tag(b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        tag(b"Y", bytes(obj))
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint")


# ----------------------------------------------------------------------------- checkpoints


def save_verified(path: str | os.PathLike, state: dict, *, keep: str | None = PREV) -> None:
    """torch.save `state` plus `state["sha256"]` (its `content_sha256`) to `path`, atomically.

    The complete temporary file is read back from disk and verified before it replaces `path`;
    the file it replaces, when it verifies, is kept as the sibling `keep` (default prev.pt; None:
    not kept). A full disk or an I/O error is one CnmError line naming `path`, and `path` (and
    `keep`) are then unchanged.
    """
    path = Path(path)
    body = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    buf = io.BytesIO()
    torch.save({**body, CHECKSUM_KEY: content_sha256(body)}, buf)

    def verify_then_keep(tmp: Path) -> None:
        _drop_cache(tmp)  # so the read-back comes from the disk, not the page cache
        try:
            load_verified(tmp, suggest=False)
        except CnmError as e:
            raise CnmError(f"{path}: the new checkpoint did not verify when read back ({e}); "
                           f"{path.name} is unchanged") from None
        if keep is not None and path.is_file():
            try:
                load_verified(path, suggest=False)
            except CnmError:
                return  # never keep a bad file over a good earlier one
            _keep_copy(path, path.with_name(keep))

    atomic_write_bytes(path, buf.getbuffer(), before_replace=verify_then_keep)


def _drop_cache(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)


def _keep_copy(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` atomically: a hard link where the file system has them."""
    tmp = temp_path(dst)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        atomic_write_bytes(dst, src.read_bytes())


def load_verified(path: str | os.PathLike, *, suggest: bool = True) -> dict:
    """Load a checkpoint written by `save_verified` (tensors on the CPU) and verify its checksum.

    A missing, truncated, foreign, unchecksummed or corrupt file is one CnmError line naming it;
    with `suggest`, the line also names the newest sibling checkpoint (prev.pt, best.pt,
    last.pt) that verifies, and how to use it. Returns the state without its checksum.
    """
    p = Path(path)
    if not p.is_file():
        raise CnmError(f"{p}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated zip, pickle of an unknown class, ...
        fault = f"not a readable checkpoint ({e.__class__.__name__})"
    else:
        fault = _checksum_fault(state)
    if fault is None:
        return {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    raise CnmError(f"{p}: {fault}" + (_alternative(p) if suggest else ""))


def _checksum_fault(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"not a cnm checkpoint (a {type(state).__name__}, not a dict)"
    want = state.get(CHECKSUM_KEY)
    if not isinstance(want, str):
        return "no checksum (not written by this cnm, or by a version before checkpoints were verified)"
    try:
        got = content_sha256({k: v for k, v in state.items() if k != CHECKSUM_KEY})
    except TypeError as e:
        return f"not a cnm checkpoint ({e})"
    return None if got == want else "corrupt (its content does not match its sha256 checksum)"


def _alternative(bad: Path) -> str:
    """'; an earlier checkpoint verifies: ...' naming the newest good sibling, or a dead end."""
    best = None
    for name in (PREV, BEST, LAST):
        other = bad.with_name(name)
        if other == bad or not other.is_file():
            continue
        try:
            epoch = load_verified(other, suggest=False).get("epoch")
        except CnmError:
            continue
        if not isinstance(epoch, int):
            epoch = -1
        if best is None or epoch > best[1]:
            best = (other, epoch)
    if best is None:
        return "; no other checkpoint of this run verifies"
    other, epoch = best
    at = f" (epoch {epoch})" if epoch >= 0 else ""
    if bad.name == LAST:
        run = shlex.quote(str(bad.parent))
        return (f"; {other.name}{at} verifies: to resume from it, `cp {shlex.quote(str(other))} "
                f"{shlex.quote(str(bad))}` then `cnm train --out {run} --resume`")
    return f"; {other.name}{at} verifies: use {shlex.quote(str(other))} instead"


def require_keys(state: Mapping, keys: Iterable[str], path: str | os.PathLike) -> None:
    """Every key (dotted for nested dicts: "optimizer.momentum") is in `state`, else one
    CnmError line naming `path` and the missing keys."""
    missing = []
    for key in keys:
        node: Any = state
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                missing.append(key)
                break
            node = node[part]
    if missing:
        raise CnmError(f"{path}: not a complete cnm checkpoint (missing {', '.join(missing)}); "
                       f"it is an older or foreign file")


def check_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, Any], what: str) -> None:
    """`got` (a loaded state dict) has exactly the tensors of `expected` (a model's state dict),
    with the same shapes, else one CnmError line naming `what` and the first offending tensor."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        raise CnmError(f"{what}: the tensors do not match the model ({'; '.join(parts)})")
    for k, want in expected.items():
        have = got[k]
        if not isinstance(have, torch.Tensor):
            raise CnmError(f"{what}: {k} is a {type(have).__name__}, not a tensor")
        if tuple(have.shape) != tuple(want.shape):
            raise CnmError(f"{what}: tensor {k} has shape {tuple(have.shape)} in the checkpoint "
                           f"but {tuple(want.shape)} in the model")


def load_state_checked(module: torch.nn.Module, state_dict: Mapping[str, Any], what: str) -> None:
    """`module.load_state_dict(state_dict)` after `check_state` (one line on any mismatch)."""
    check_state(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict)
