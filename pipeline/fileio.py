"""The project's one atomic file writer, and the clean-up of what a killed writer leaves.

`atomic_output(path)` (write the yielded temporary path by any means) and
`atomic_write_bytes/json/text` write a temporary sibling `.NAME.tmp-HOST-PID-XXXXXXXX`, fsync
it, `os.replace` it onto `path` and fsync the directory: a crash at any moment leaves either
the old or the new complete file, never a mix. The file is created with mode `0o666 & ~umask`
(like `open()`, unlike `mkstemp`'s 0600). A failed write (a full disk, an I/O error) removes
the temporary file, leaves `path` as it was, and is one `CnmError` line naming `path`. The host
and PID in the temporary name let the next run remove the files of a writer that was killed
outright (`kill -9`, power loss) without touching a live writer's (`remove_stale_temps`).
See docs/cli.md#the-run-directory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import CnmError

Buffer = bytes | bytearray | memoryview

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_CHUNK = 1 << 24  # bytes per os.write call (a partial write is continued)


def host_tag() -> str:
    """This machine's name as used in temporary names: [A-Za-z0-9_.], at most 40 characters."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")[:40]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (True when that cannot be told: keep its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def os_error_reason(e: OSError) -> str:
    """A short reason for an OSError: "no space left on device", "permission denied", ..."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.EIO: "input/output error"}
    return reasons.get(e.errno) or e.strerror or str(e)


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling name for `path`: `.NAME.tmp-HOST-PID-XXXXXXXX` (8 hex)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """(target name, host, PID) of a temporary name made by `temp_path`, else None."""
    m = _TEMP.match(name)
    return (m["name"], m["host"], int(m["pid"])) if m else None


def remove_stale_temps(directory: str | os.PathLike, also=None) -> list[str]:
    """Delete the temporary files in `directory` whose writer was a process of this host that no
    longer runs; returns their names. Files of live processes, of this process and of other
    hosts are kept. `also(name) -> bool`: further file names to delete (a caller that knows no
    one else writes them, e.g. under a lock)."""
    me, host = os.getpid(), host_tag()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        parsed = parse_temp_name(entry.name)
        stale = parsed is not None and parsed[1] == host and parsed[2] != me and not pid_alive(parsed[2])
        if not (stale or (also is not None and also(entry.name))):
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.name)
    return sorted(removed)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (a file system without directory fsync is skipped)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *,
                  before_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a new, empty temporary sibling of `path` to write by any means (os.write, savefig,
    a download); when the block ends normally it is fsync'ed, passed to `before_replace(tmp)`
    (to read it back and verify it, to keep the previous file), renamed onto `path`, and the
    directory is fsync'ed.

    Whatever the block or `before_replace` raise removes the temporary file and leaves `path`
    unchanged; an OSError (ENOSPC, EIO, EACCES, ...) becomes one CnmError line naming `path`.
    """
    path = Path(path)
    existed = path.exists()
    tmp, replaced = None, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        # O_EXCL: never someone else's file; mode 0o666 minus the umask, applied by the kernel
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        tmp, replaced = None, True
        fsync_dir(path.parent)
    except OSError as e:
        kept = ("the new file is in place but may not survive a power loss" if replaced else
                "the previous file is unchanged" if existed else "nothing was written")
        raise CnmError(f"{path}: could not write ({os_error_reason(e)}); {kept}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_bytes(path: str | os.PathLike, data: Buffer | list[Buffer], *,
                       before_replace: Callable[[Path], None] | None = None) -> None:
    """Write `data` (bytes-like, or a list of them written one after the other, so nothing is
    concatenated in memory) to `path` atomically (`atomic_output`: one-line CnmError naming
    `path` on an OSError, `path` unchanged on any failure)."""
    with atomic_output(path, before_replace=before_replace) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for part in data if isinstance(data, list) else [data]:
                view = memoryview(part).cast("B")
                while len(view):
                    view = view[os.write(fd, view[:_CHUNK]):]
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_bytes` of `obj` as indented JSON plus a newline."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
