"""trainer/rundir.py under real faults: two processes on one run directory (and the lock freed
by SIGKILL), a checkpoint writer killed mid-write, a 4 KB overwrite / truncation / foreign
file / missing key / wrong shape in a checkpoint, a read-back that does not verify."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.errors import CnmError
from pipeline.fileio import host_tag, parse_temp_name
from trainer import rundir
from trainer.rundir import (
    LOCK,
    PREV,
    SEAL,
    RunLock,
    check_state,
    clean_litter,
    load_state_checked,
    load_verified,
    require_keys,
    save_verified,
)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _child(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _state(epoch: int, n: int = 1 << 18) -> dict:
    g = torch.Generator().manual_seed(epoch)
    return {"format": 1, "epoch": epoch, "config": {"lr": 0.1, "seed": 0},
            "peers": [{"w": torch.randn(n, generator=g), "bn.num_batches_tracked": torch.tensor(epoch)}],
            "optimizer": {"momentum": [{"w": torch.zeros(4, dtype=torch.bfloat16)}]},
            "metrics": {"loss": float("nan"), "acc": [1.5, 2.0]}, "teacher": None}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- the lock

HOLDER = """
import sys
from trainer.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.readline()
"""


def test_second_process_is_refused_naming_the_holder_and_sigkill_frees_it(tmp_path):
    run = tmp_path / "run"
    child = _child(HOLDER, run)
    try:
        assert child.stdout.readline() == "locked\n"
        info = json.loads((run / LOCK).read_text())
        assert info["pid"] == child.pid and info["host"] == host_tag()
        with pytest.raises(CnmError) as e:
            RunLock(run).acquire()
        msg = _one_line(e)
        assert msg.startswith(f"{run}: in use by another cnm process (host {host_tag()}, PID {child.pid}, since ")
        assert "choose another --out" in msg and "no longer runs" not in msg
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with RunLock(run) as lock:          # the OS released it with the process
        assert lock.held and json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert not lock.held


def test_two_locks_in_one_process_conflict_and_release_frees(tmp_path):
    a = RunLock(tmp_path).acquire()
    assert a.acquire() is a                            # re-acquiring one's own lock is a no-op
    with pytest.raises(CnmError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    a.release()
    RunLock(tmp_path).acquire().release()


def test_holder_whose_pid_is_gone_is_explained(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = RunLock(tmp_path).acquire()  # stands for a forked child still holding a dead parent's lock
    (tmp_path / LOCK).write_text(json.dumps({"host": host_tag(), "pid": gone.pid, "since": "t"}))
    with pytest.raises(CnmError, match="no longer runs, so a child process of it still holds the lock"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK).write_text("")
    with pytest.raises(CnmError, match="holder not recorded yet"):
        RunLock(tmp_path).acquire()
    lock.release()


def test_lock_in_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CnmError, match="cannot create the run lock"):
        RunLock(tmp_path / "file" / "run").acquire()


# ----------------------------------------------------------------------------- litter

# a checkpoint writer stopped inside its fsync (the bytes written, not yet renamed)
KILLED_SAVER = """
import os, sys
import torch
from trainer.rundir import save_verified
def stuck(fd):
    print("mid-write", flush=True)
    sys.stdin.readline()
os.fsync = stuck
save_verified(sys.argv[1], {"epoch": 2, "w": torch.zeros(50000)})
"""


def test_kill_9_mid_write_litter_is_removed_by_the_next_run(tmp_path):
    save_verified(tmp_path / "last.pt", _state(1, 16), keep=PREV)
    legacy = tmp_path / ".config.json.tmp-ab_c1234"    # the earlier writer's mkstemp name
    legacy.write_text("{")
    foreign = tmp_path / ".notes.txt.tmp-ab_c1234"     # not a run file: kept
    foreign.write_text("x")
    child = _child(KILLED_SAVER, tmp_path / "last.pt")
    try:
        assert child.stdout.readline() == "mid-write\n"
        [litter] = [p.name for p in tmp_path.iterdir() if parse_temp_name(p.name)]
        assert (tmp_path / litter).stat().st_size > 200000
        assert clean_litter(tmp_path) == [legacy.name]   # the live writer's file is kept
        assert (tmp_path / litter).exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert clean_litter(tmp_path) == [litter]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", foreign.name])
    assert load_verified(tmp_path / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- verified checkpoints


def test_save_load_round_trip_keeps_the_previous(tmp_path):
    last = tmp_path / "last.pt"
    save_verified(last, _state(1), keep=PREV)
    assert _same(load_verified(last), _state(1)) and not (tmp_path / PREV).exists()
    save_verified(last, _state(2), keep=PREV)
    assert _same(load_verified(last), _state(2)) and _same(load_verified(tmp_path / PREV), _state(1))
    assert os.stat(last).st_ino != os.stat(tmp_path / PREV).st_ino
    save_verified(tmp_path / "best.pt", _state(5, 16))   # keep=None: prev.pt stays last.pt's
    save_verified(tmp_path / "best.pt", _state(6, 16))
    assert load_verified(tmp_path / PREV)["epoch"] == 1 and load_verified(tmp_path / "best.pt")["epoch"] == 6
    (tmp_path / "best.pt").unlink()
    # a plain torch.load and zipfile still read it (the seal is the zip's comment)
    assert _same(torch.load(last, weights_only=True), _state(2))
    with zipfile.ZipFile(last) as z:
        assert z.comment.startswith(SEAL) and len(z.comment) == len(SEAL) + 64 and z.testzip() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


def test_4k_overwrite_mid_file_is_refused_and_names_the_earlier_checkpoint(tmp_path):
    last = tmp_path / "last.pt"
    save_verified(last, _state(1), keep=PREV)
    save_verified(last, _state(2), keep=PREV)
    size = last.stat().st_size
    with open(last, "r+b") as f:                      # same size, 4 KB of garbage mid-file
        f.seek(size // 2)
        f.write(os.urandom(4096))
    assert last.stat().st_size == size
    assert torch.load(last, weights_only=True)["epoch"] == 2   # the fault: torch loads it silently
    with pytest.raises(CnmError) as e:
        load_verified(last)
    msg = _one_line(e)
    assert msg.startswith(f"{last}: corrupt: its bytes do not match its sha256 checksum; ")
    assert f"prev.pt (epoch 1) verifies: to resume from it, `cp {tmp_path / PREV} {last}` then " \
           f"`cnm train --out {tmp_path} --resume`" in msg


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_a_last_corrupted_since_it_was_written_is_not_kept_over_prev(tmp_path, how):
    last = tmp_path / "last.pt"
    save_verified(last, _state(1, 4096), keep=PREV)
    save_verified(last, _state(2, 4096), keep=PREV)
    bad = bytearray(last.read_bytes())
    bad[len(bad) // 2] ^= 0xFF                         # one flipped byte
    if how == "in place":
        with open(last, "r+b") as f:
            f.write(bad)
        st = last.stat()                               # as during the next epoch: the clock moved on
        os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    else:
        (tmp_path / "copy").write_bytes(bad)
        os.replace(tmp_path / "copy", last)
    save_verified(last, _state(3, 4096), keep=PREV)
    assert load_verified(tmp_path / PREV)["epoch"] == 1 and load_verified(last)["epoch"] == 3


def test_corrupt_best_points_to_the_newest_good_sibling(tmp_path):
    save_verified(tmp_path / "last.pt", _state(1, 16), keep=PREV)
    save_verified(tmp_path / "last.pt", _state(3, 16), keep=PREV)
    save_verified(tmp_path / "best.pt", _state(2, 16))
    (tmp_path / "best.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:-100])   # truncated
    with pytest.raises(CnmError) as e:
        load_verified(tmp_path / "best.pt")
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / 'best.pt'}: not a complete checkpoint file (truncated, ")
    assert msg.endswith(f"; last.pt (epoch 3) verifies: use {tmp_path / 'last.pt'} instead")


def test_truncated_foreign_and_unchecksummed_files(tmp_path):
    p = tmp_path / "last.pt"
    save_verified(p, _state(1, 64))
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CnmError) as e:
        load_verified(p)
    assert _one_line(e) == (f"{p}: not a complete checkpoint file (truncated, corrupt or foreign: no "
                            f"checksum at its end); no other checkpoint of this run verifies")
    old = io.BytesIO()
    torch.save({"epoch": 1, "peers": []}, old)
    cases = {
        "pickle": (pickle.dumps({"epoch": 1}), "not a complete checkpoint file"),
        "text": (b"hello", "not a complete checkpoint file"),
        "empty": (b"", "not a complete checkpoint file"),
        "old": (old.getvalue(), "no checksum (not written by this cnm, or by a version before"),
    }
    for name, (raw, want) in cases.items():
        f = tmp_path / f"{name}.pt"
        f.write_bytes(raw)
        with pytest.raises(CnmError) as e:
            load_verified(f, suggest=False)
        assert _one_line(e).startswith(f"{f}: {want}"), name
    save_verified(tmp_path / "list.pt", [1, 2])
    with pytest.raises(CnmError, match=r"list.pt: not a cnm checkpoint \(a list, not a dict\)$"):
        load_verified(tmp_path / "list.pt", suggest=False)
    with pytest.raises(CnmError, match="checkpoint not found"):
        load_verified(tmp_path / "none.pt")


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_4k_overwrite_anywhere_is_refused(tmp_path, where):
    p = tmp_path / "best.pt"
    save_verified(p, _state(1, 4096))
    size = p.stat().st_size
    offset = {"start": 0, "middle": size // 2, "end": size - 4096 - 100}[where]
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(4096))
    with pytest.raises(CnmError, match=f"^{p}: corrupt: its bytes do not match its sha256 checksum"):
        load_verified(p, suggest=False)


def test_a_read_back_that_does_not_verify_leaves_last_unchanged(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    save_verified(last, _state(1), keep=PREV)

    def corrupt_on_disk(tmp: Path):                   # the bytes on disk differ from those written
        with open(tmp, "r+b") as f:
            f.seek(tmp.stat().st_size // 2)
            f.write(os.urandom(4096))

    monkeypatch.setattr(rundir, "_drop_cache", corrupt_on_disk)
    with pytest.raises(CnmError) as e:
        save_verified(last, _state(2), keep=PREV)
    assert _one_line(e).startswith(f"{last}: the new checkpoint did not verify when read back (")
    assert load_verified(last)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_full_disk_while_saving_keeps_last_and_prev(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    save_verified(last, _state(1, 16), keep=PREV)
    save_verified(last, _state(2, 16), keep=PREV)
    real = os.write

    def full(fd, b):
        if os.fstat(fd).st_size > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, b[:512])

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(CnmError) as e:
        save_verified(last, _state(3), keep=PREV)
    monkeypatch.undo()
    assert _one_line(e) == f"{last}: could not write (no space left on device); the previous file is unchanged"
    assert load_verified(last)["epoch"] == 2 and load_verified(tmp_path / PREV)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


# ----------------------------------------------------------------------------- keys and shapes


def test_require_keys_is_one_line(tmp_path):
    state = {"epoch": 1, "optimizer": {"momentum": []}}
    require_keys(state, ["epoch", "optimizer.momentum"], tmp_path / "last.pt")
    with pytest.raises(CnmError) as e:
        require_keys(state, ["epoch", "peers", "optimizer.momentum", "schedule.lr"], tmp_path / "last.pt")
    assert _one_line(e) == (f"{tmp_path / 'last.pt'}: not a complete cnm checkpoint (missing peers, "
                            f"schedule.lr); it is an older or foreign file")


def test_shape_mismatch_names_the_tensor():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    good = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    load_state_checked(net, good, "last.pt: peer 0")
    assert torch.equal(net[0].weight, good["0.weight"])
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5)).state_dict()
    with pytest.raises(CnmError) as e:
        load_state_checked(net, other, "last.pt: peer 0")
    assert _one_line(e) == "last.pt: peer 0: tensor 0.weight has shape (5, 4) in the checkpoint but (3, 4) in the model"
    assert torch.equal(net[0].weight, good["0.weight"])               # nothing was loaded
    missing = {k: v for k, v in good.items() if k != "1.running_mean"}
    with pytest.raises(CnmError, match=r"do not match the model \(missing 1.running_mean\)"):
        check_state(net.state_dict(), missing, "x")
    with pytest.raises(CnmError, match=r"unexpected extra"):
        check_state(net.state_dict(), {**good, "extra": torch.zeros(1)}, "x")
    with pytest.raises(CnmError, match="0.bias is a list, not a tensor"):
        check_state(net.state_dict(), {**good, "0.bias": [0.0]}, "x")
