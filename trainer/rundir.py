"""The run directory's safety: one process per directory, no litter, verified checkpoints.

- `RunLock(run)`: an exclusive `fcntl.flock` on `RUN/.lock` for the whole run (the OS releases
  it when the process dies, however it dies); a second process gets one line naming the holder.
- `clean_litter(run)`: removes the temporary files of writers killed mid-write.
- `save_verified` / `load_verified`: a checkpoint carries the sha256 of its bytes (in its zip
  comment), is read back and verified before it replaces `last.pt`, the replaced one is kept as
  `prev.pt`, and every load verifies it (a corrupt file is one line that names the earlier
  checkpoint to use).
- `require_keys`, `check_state`, `load_state_checked`: an older or foreign file, or a model of
  another shape, is one line, never a KeyError or a size-mismatch traceback.
See docs/cli.md#the-run-directory.
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
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from typing import Self  # Python >= 3.11; annotations only

# the files of a run directory (trainer/checkpoint.py describes them)
LAST = "last.pt"
BEST = "best.pt"
PREV = "prev.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
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
    return remove_stale_temps(run_dir, also=lambda name: _LEGACY_TEMP.match(name) is not None)


# ----------------------------------------------------------------------------- checkpoints
#
# The checksum lives in the zip comment of the torch.save file: the zip's end record (the last
# 22 bytes, `PK\x05\x06 ...`) ends with a comment length and the comment, which torch.save
# leaves empty. The seal sets it to `cnm-sha256:<64 hex>`, the sha256 of every byte before the
# comment length. The result is a standard zip, so `torch.load` and `unzip` read it unchanged;
# it is one file, so the checksum is written in the same atomic rename as the data; and it is
# verified by hashing the bytes, before torch parses anything and without unpickling. By hand:
# `head -c -77 RUN/last.pt | sha256sum` equals the comment's digest (`unzip -z RUN/last.pt`).

SEAL = b"cnm-sha256:"
_EOCD = b"PK\x05\x06"
_COMMENT = len(SEAL) + 64          # bytes of the comment
_TAIL = 2 + _COMMENT               # the comment length field and the comment


def save_verified(path: str | os.PathLike, state: dict, *, keep: str | None = None) -> None:
    """torch.save `state` to `path` atomically, sealed with the sha256 of its bytes.

    The complete temporary file is read back from the disk and verified before it replaces
    `path`; the file it replaces, when it verifies, is kept as the sibling named `keep` (PREV
    for last.pt; None: not kept). A full disk or an I/O error is one CnmError line naming `path`,
    and `path` (and `keep`) are then unchanged.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    raw = buf.getbuffer()
    if len(raw) < 22 or raw[-22:-18] != _EOCD or raw[-2:] != b"\0\0":
        raise RuntimeError("torch.save no longer ends its file with a comment-less zip end record")
    body = raw[:-2]
    comment = SEAL + hashlib.sha256(body).hexdigest().encode()

    def verify_then_keep(tmp: Path) -> None:
        _drop_cache(tmp)  # so the read-back comes from the disk, not the page cache
        fault = seal_fault(tmp)
        if fault is not None:
            raise CnmError(f"{path}: the new checkpoint did not verify when read back ({fault}); "
                           f"{path.name} is unchanged")
        if keep is not None and path.is_file() and (_unchanged(path) or seal_fault(path) is None):
            _keep_copy(path, path.with_name(keep))   # never a bad file over a good earlier one

    atomic_write_bytes(path, [body, struct.pack("<H", _COMMENT), comment], before_replace=verify_then_keep)
    _remember(path)


# files this process verified, by (device, inode, size, mtime): one that has not changed since
# is not hashed again before it is kept as prev.pt (a checkpoint of a few GB takes seconds)
_VERIFIED: dict[str, tuple[int, int, int, int]] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path) -> None:
    _VERIFIED[os.path.abspath(path)] = _identity(path)


def _unchanged(path: Path) -> bool:
    return _VERIFIED.get(os.path.abspath(path)) == _identity(path)


def seal_fault(path: str | os.PathLike) -> str | None:
    """None when the file's bytes match its seal, else what is wrong (a few words)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size >= 22 + _COMMENT:
            f.seek(size - 22 - _COMMENT)
            end = f.read(22 + _COMMENT)
            if end[:4] == _EOCD and end[20:22] == struct.pack("<H", _COMMENT) and end[22:].startswith(SEAL):
                f.seek(0)
                h = hashlib.sha256()
                left = size - _TAIL
                while left > 0:
                    chunk = f.read(min(left, 1 << 22))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
                ok = h.hexdigest().encode() == end[22 + len(SEAL):]
                return None if ok else "corrupt: its bytes do not match its sha256 checksum"
        f.seek(max(size - 22, 0))
        if f.read(4) == _EOCD:
            return "no checksum (not written by this cnm, or by a version before checkpoints were verified)"
    return "not a complete checkpoint file (truncated, corrupt or foreign: no checksum at its end)"


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
    """Verify a checkpoint written by `save_verified`, then load it (tensors on the CPU).

    A missing, truncated, foreign, unsealed or corrupt file is one CnmError line naming it;
    with `suggest`, the line also names the newest sibling checkpoint (prev.pt, best.pt,
    last.pt) that verifies, and how to use it.
    """
    p = Path(path)
    if not p.is_file():
        raise CnmError(f"{p}: checkpoint not found")
    try:
        fault = seal_fault(p)
    except OSError as e:
        raise CnmError(f"{p}: cannot read the checkpoint ({os_error_reason(e)})") from None
    if fault is None:
        try:
            with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it
                warnings.simplefilter("ignore")
                state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- a sealed file of classes torch will not load
            fault = f"not a cnm checkpoint ({e.__class__.__name__})"
        else:
            if isinstance(state, dict):
                _remember(p)
                return state
            fault = f"not a cnm checkpoint (a {type(state).__name__}, not a dict)"
    raise CnmError(f"{p}: {fault}" + (_alternative(p) if suggest else ""))


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
