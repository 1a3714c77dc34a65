"""pipeline/fileio.py: the atomic writer under real faults (a full tmpfs, injected ENOSPC/EIO, a
writer killed with SIGKILL mid-write), its file modes under the umask, and the clean-up of what
a killed writer leaves."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import fileio
from pipeline.errors import CnmError
from pipeline.fileio import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    parse_temp_name,
    remove_stale_temps,
    temp_path,
)

ROOT = Path(__file__).resolve().parents[2]


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)


def test_round_trip_replaces_and_leaves_nothing(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    atomic_write_text(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(p, memoryview(b"xyz"))
    assert p.read_bytes() == b"xyz" and _temps(p.parent) == []


def test_atomic_output_takes_any_writer_and_drops_a_failed_one(tmp_path):
    p = tmp_path / "plot.png"
    with atomic_output(p) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and not p.exists()
        with open(tmp, "w") as f:                     # e.g. fig.savefig(tmp), np.save(f, ...)
            f.write("one")
    assert p.read_text() == "one"
    with pytest.raises(ValueError), atomic_output(p) as tmp:
        tmp.write_text("half")
        raise ValueError("the writer failed")
    full = f"^{p}: could not write \\(no space left on device\\); the previous"
    with pytest.raises(CnmError, match=full), atomic_output(p):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert p.read_text() == "one" and _temps(tmp_path) == []


def test_partial_os_writes_are_continued(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: real(fd, bytes(b[:3])))
    data = bytes(range(256)) * 5
    atomic_write_bytes(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "last.pt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == mode


def test_temp_names_carry_host_and_pid(tmp_path):
    t = temp_path(tmp_path / "last.pt")
    assert t.parent == tmp_path and t.name.startswith(f".last.pt.tmp-{fileio.host_tag()}-{os.getpid()}-")
    assert parse_temp_name(t.name) == ("last.pt", fileio.host_tag(), os.getpid())
    assert parse_temp_name("last.pt") is None and parse_temp_name(".last.pt.tmp-abcd1234") is None


@pytest.mark.parametrize("where,err,reason", [
    ("write", errno.ENOSPC, "no space left on device"),
    ("fsync", errno.EIO, "input/output error"),
    ("replace", errno.EACCES, "permission denied"),
])
def test_os_errors_are_one_line_naming_the_file(tmp_path, monkeypatch, where, err, reason):
    p = tmp_path / "last.pt"
    p.write_bytes(b"old")

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, where, fail)
    with pytest.raises(CnmError) as e:
        atomic_write_bytes(p, b"new" * 1000)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith(f"{p}: could not write ({reason})") and "\n" not in msg
    assert "previous file is unchanged" in msg
    assert p.read_bytes() == b"old" and _temps(tmp_path) == []


def test_failure_on_a_new_file_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "x")))
    with pytest.raises(CnmError, match="nothing was written"):
        atomic_write_json(tmp_path / "config.json", {})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_before_replace_and_interrupts_leave_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    seen = []

    def refuse(tmp: Path):
        seen.append(tmp.read_bytes())
        raise CnmError("bad")

    with pytest.raises(CnmError, match="bad"):
        atomic_write_bytes(p, b"new", before_replace=refuse)
    assert seen == [b"new"] and p.read_bytes() == b"old" and _temps(tmp_path) == []
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old" and _temps(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                           check=False, capture_output=True, text=True)
    except OSError as e:  # no mount command
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_names_the_file_and_keeps_the_old_one(tiny_tmpfs):
    p = tiny_tmpfs / "last.pt"
    atomic_write_bytes(p, b"old" * 100)
    with pytest.raises(CnmError) as e:
        atomic_write_bytes(p, os.urandom(1 << 20))
    msg = str(e.value)
    assert msg == f"{p}: could not write (no space left on device); the previous file is unchanged"
    assert p.read_bytes() == b"old" * 100 and _temps(tiny_tmpfs) == []
    atomic_write_bytes(p, b"fits")  # the space of the failed write was given back
    assert p.read_bytes() == b"fits"


# the writer is stopped inside its fsync (the data written, not yet renamed), then SIGKILLed
KILLED_WRITER = """
import os, sys
from pipeline import fileio
def stuck(fd):
    print("mid-write", flush=True)
    sys.stdin.readline()
os.fsync = stuck
fileio.atomic_write_bytes(sys.argv[1], b"x" * 100000)
"""


def test_a_killed_writer_s_temp_file_is_removed_only_once_it_is_dead(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline() == "mid-write\n"
        [litter] = _temps(tmp_path)
        assert parse_temp_name(litter)[2] == child.pid
        assert (tmp_path / litter).stat().st_size == 100000
        assert remove_stale_temps(tmp_path) == []          # a live writer's file is kept
        assert _temps(tmp_path) == [litter]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert remove_stale_temps(tmp_path) == [litter]
    assert _temps(tmp_path) == [] and target.read_bytes() == b"old"


def test_other_hosts_and_own_files_are_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free once it has been waited for
    mine = temp_path(tmp_path / "a")
    other_host = tmp_path / f".a.tmp-{'elsewhere' if socket.gethostname() != 'elsewhere' else 'x'}-{dead.pid}-0123abcd"
    stale = tmp_path / f".a.tmp-{fileio.host_tag()}-{dead.pid}-0123abcd"
    for p in (mine, other_host, stale):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [stale.name]
    assert sorted(_temps(tmp_path)) == sorted([mine.name, other_host.name])
