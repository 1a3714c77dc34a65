"""`cnm train` / `cnm eval` under injected faults (issue 12): a second process on the run
directory, SIGTERM and Ctrl-C, a corrupted byte range, a kill -9 mid-write, a full disk, bad
labels with a matching manifest, other data on resume, bad flags. Each asserts the exit code, one
`error:` line without a traceback, and that nothing was lost: a resumed run ends with the
metrics of the uninterrupted one (tests/trainer/test_resume.py's reference, timing dropped)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import fileio
from tests.cli.clirun import run_main
from tests.trainer.test_loop import synthetic_dir, tiny
from tests.trainer.test_resume import EPOCHS, ROOT, SETTINGS, _cli, _strip
from trainer import checkpoint as ckpt
from trainer.loop import train

# the children compute with the thread count of this process (conftest's), so that their metrics
# can equal the in-process reference bit for bit (the thread count changes CPU summation order)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_dir(tmp_path_factory.mktemp("data"), train=128, test=64)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """The uninterrupted run (test_resume's settings)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(tiny(data, run, **SETTINGS))
    return run


@pytest.fixture(scope="module")
def reference(reference_run):
    """Its metrics rows without the timing columns."""
    return _strip(ckpt.read_jsonl(reference_run / "metrics.jsonl"))


cnm = run_main                                  # `cnm ARGV` in this process


def one_error(code, err, *parts):
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for p in parts:
        assert p in err, (p, err)


def _cmd(data, run, *extra):
    return _cli(data, run, *extra)[4:]          # the same flags, for cnm(...) in this process


def _start(argv, **env):
    return subprocess.Popen(argv, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_line(stream, prefix):
    """Read lines until one starts with `prefix` (the child prints it when it gets there)."""
    seen = []
    for line in stream:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"never printed {prefix!r}: {''.join(seen)}")


def _resume_to_the_end(run, capsys, reference):
    code, out, err = cnm(["train", "--out", run, "--resume", "--quiet"], capsys)
    assert code == 0, err
    assert _strip(ckpt.read_jsonl(run / "metrics.jsonl")) == reference
    return out


# ----------------------------------------------------------------------------- 1, 4, 9


def test_a_second_process_is_refused_and_sigterm_stops_cleanly(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    # A hangs before step 3 of epoch 2 (CNM_FAULT), holding the lock: a condition, not a sleep
    a = _start(_cli(data, run), CNM_FAULT="0:2:3:hang")
    try:
        _wait_line(a.stderr, "CNM_FAULT: hanging at rank 0, epoch 2, step 3")
        for extra in ([], ["--resume"]):
            b = subprocess.run(_cli(data, run, *extra), check=False, cwd=ROOT, env=ENV, capture_output=True, text=True,
                               timeout=300)
            one_error(b.returncode, b.stderr, f"{run}: in use by another cnm process",
                      f"PID {a.pid}")
        a.send_signal(signal.SIGTERM)            # the step never ends: the first only sets the flag
        _wait_line(a.stderr, "SIGTERM: stopping at the end of the current step")
        a.send_signal(signal.SIGTERM)            # the second abandons it
        _out, err = a.communicate(timeout=120)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 143 and "Traceback" not in err
    assert err.splitlines()[-2:] == [
        "stopped by SIGTERM",
        f"{run}: stopped after epoch 1/{EPOCHS} (last.pt holds epoch 1); to continue: cnm train --out {run} --resume"]
    assert [r["epoch"] for r in ckpt.read_jsonl(run / "metrics.jsonl")] == [1]
    out = _resume_to_the_end(run, capsys, reference)
    assert f"resuming {run}: 1/{EPOCHS} epochs done, continuing with epoch 2" in out


def test_sigterm_finishes_the_step_then_resumes_to_the_same_metrics(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    a = _start(_cli(data, run))
    try:
        _wait_line(a.stdout, f"epoch 1/{EPOCHS}")     # printed after epoch 1 was saved
        a.send_signal(signal.SIGTERM)
        _out, err = a.communicate(timeout=300)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 143 and "Traceback" not in err, err
    assert err.splitlines()[-2] == "stopped by SIGTERM"
    assert err.splitlines()[-1].endswith(f"to continue: cnm train --out {run} --resume")
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    _resume_to_the_end(run, capsys, reference)


def test_ctrl_c_in_the_first_epoch_is_no_dead_end(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    a = _start(_cli(data, run))
    try:
        _wait_line(a.stdout, f"run {run}:")          # built, in epoch 1
        a.send_signal(signal.SIGINT)
        _out, err = a.communicate(timeout=300)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"{run}: stopped in epoch 1/{EPOCHS}, before the first checkpoint; "
                                    f"to start it again with its settings: cnm train --out {run} --resume")
    assert (run / "config.json").is_file() and not (run / "last.pt").exists()
    # the advice is true: without --resume it says "pass --resume", and --resume starts it over
    code, _, err = cnm(["train", *_cmd(data, run)], capsys)
    one_error(code, err, "already holds a run; pass --resume")
    out = _resume_to_the_end(run, capsys, reference)
    assert f"restarting {run} from epoch 1 with its saved settings" in out


# ----------------------------------------------------------------------------- 3, 5, 8, 9


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


KILLED_WRITER = """
import sys
from pipeline.fileio import atomic_output
with atomic_output(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 100000)
        f.flush()
        print(tmp.name, flush=True)
        sys.stdin.readline()
"""


def test_corrupt_last_pt_names_the_good_one_and_kill_9_litter_is_removed(reference_run, reference, tmp_path,
                                                                         capsys):
    run = _copy_run(reference_run, tmp_path / "run")
    last = run / "last.pt"
    size = last.stat().st_size
    with open(last, "r+b") as f:                 # same size, 4 KB overwritten mid-file
        f.seek(size // 2)
        f.write(os.urandom(4096))
    assert last.stat().st_size == size
    # a writer killed with SIGKILL in the middle of writing last.pt leaves its temporary file
    w = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last)], cwd=ROOT, env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    litter = run / w.stdout.readline().strip()
    w.kill()
    w.wait()
    assert litter.is_file()

    code, out, err = cnm(["train", "--out", run, "--resume", "--quiet"], capsys)
    one_error(code, err, f"{last}: corrupt: its bytes do not match its sha256 checksum",
              f"` then `cnm train --out {run} --resume`")
    # the newest checkpoint that verifies: best.pt when epoch 3 was the best, else prev.pt (epoch 2)
    good = run / re.search(r"; (\w+\.pt) \(epoch \d\) verifies: to resume from it, `cp ", err)[1]
    assert f"`cp {good} {last}`" in err and good.name in ("best.pt", "prev.pt")
    assert not litter.exists() and f"removed 1 temporary file(s) left by a killed run: {litter.name}" in out
    code, _, err = cnm(["eval", last, "--device", "cpu", "--quiet"], capsys)
    one_error(code, err, f"{last}: corrupt")
    # following the advice loses nothing (from prev.pt, epoch 3 is trained again): the same metrics
    epoch = ckpt.load_checkpoint(good)["epoch"]
    shutil.copyfile(good, last)
    out = _resume_to_the_end(run, capsys, reference)
    assert f"{epoch}/{EPOCHS} epochs" in out
    # 9: resuming a finished run says so; --epochs says what changed
    code, out, _ = cnm(["train", "--out", run, "--resume", "--quiet"], capsys)
    assert code == 0 and f"{run}: the run is complete ({EPOCHS}/{EPOCHS} epochs)" in out
    code, out, _ = cnm(["train", "--out", run, "--resume", "--quiet", "--epochs", EPOCHS - 1], capsys)
    assert code == 0 and f"shortening from {EPOCHS} to {EPOCHS - 1} epochs; {EPOCHS} epochs are already done" in out
    assert _strip(ckpt.read_jsonl(run / "metrics.jsonl")) == reference
    # 8: cnm eval keeps one result per checkpoint
    for name in ("best", "last"):
        code, _, err = cnm(["eval", run / f"{name}.pt", "--device", "cpu", "--quiet"], capsys)
        assert code == 0 and f"eval-{name}.json" in err
    assert json.loads((run / "eval-last.json").read_text())["epoch"] == EPOCHS


def test_missing_keys_and_shape_mismatch_are_one_line(reference_run, tmp_path, capsys):
    state = ckpt.load_checkpoint(reference_run / "last.pt")
    run = _copy_run(reference_run, tmp_path / "keys")
    ckpt.save_checkpoint(run / "last.pt", {k: v for k, v in state.items() if k != "optimizer"})
    code, _, err = cnm(["train", "--out", run, "--resume"], capsys)
    one_error(code, err, f"{run / 'last.pt'}: not a complete cnm checkpoint (missing optimizer.momentum)")
    run = _copy_run(reference_run, tmp_path / "shape")
    state["peers"][1]["fc.weight"] = torch.zeros(3, 64)
    ckpt.save_checkpoint(run / "last.pt", state)
    code, _, err = cnm(["train", "--out", run, "--resume"], capsys)
    one_error(code, err, "peer 1: tensor fc.weight has shape (3, 64) in the checkpoint but (10, 64) in the model")
    code, _, err = cnm(["eval", run / "last.pt", "--device", "cpu"], capsys)
    one_error(code, err, "tensor fc.weight has shape (3, 64)")


# ----------------------------------------------------------------------------- 6


def test_disk_full_names_the_file_and_writes_no_row(data, reference, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_write = os.write
    temps = set()

    def write(fd, buf):                          # ENOSPC for the second last.pt only (epoch 2)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if Path(name).name.startswith(".last.pt.tmp-"):
            temps.add(name)
            if len(temps) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buf)

    monkeypatch.setattr(fileio.os, "write", write)
    code, _, err = cnm(["train", *_cmd(data, run)], capsys)
    monkeypatch.undo()
    one_error(code, err, f"{run / 'last.pt'}: could not write (no space left on device); the previous file is "
                         f"unchanged")
    assert [r["epoch"] for r in ckpt.read_jsonl(run / "metrics.jsonl")] == [1]
    assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    _resume_to_the_end(run, capsys, reference)


# ----------------------------------------------------------------------------- 7, 8


def _with_bad_label(src: Path, dst: Path, split: str, value: int) -> Path:
    """A copy of a prepared dataset with one label of `split` set to `value`, its manifest updated
    to match (so only the range check can catch it)."""
    shutil.copytree(src, dst)
    name = f"{split}_labels.npy"
    labels = np.load(dst / name)
    labels[3] = value
    np.save(dst / name, labels)
    man = json.loads((dst / "manifest.json").read_text())
    raw = (dst / name).read_bytes()
    man["files"][name].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.mark.parametrize("split,value", [("train", 10), ("test", -1)])
def test_a_bad_label_stops_before_any_step(data, tmp_path, capsys, split, value):
    bad = _with_bad_label(data, tmp_path / "data", split, value)
    run = tmp_path / "run"
    code, _, err = cnm(["train", *_cmd(bad, run)], capsys)
    one_error(code, err, f"{bad / f'{split}_labels.npy'}: label {value} at index 3 is outside 0..9")
    assert not run.exists()


@pytest.mark.parametrize("key,value,msg", [
    ("std", [60.0, 0.0, 60.0], "std > 0 (a constant channel cannot be normalised)"),
    ("std", [60.0, float("nan"), 60.0], "must be 3 finite values"),
    ("num_classes", 12, "num_classes 12 does not match the 10 class names"),
])
def test_a_bad_manifest_is_one_line_naming_it(data, tmp_path, capsys, key, value, msg):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man[key] = value
    (bad / "manifest.json").write_text(json.dumps(man))
    code, _, err = cnm(["train", *_cmd(bad, tmp_path / "run")], capsys)
    one_error(code, err, f"{bad / 'manifest.json'}: ", msg)
    assert not (tmp_path / "run").exists()


def test_other_data_on_resume_needs_allow_new_data(reference_run, tmp_path, capsys):
    run = _copy_run(reference_run, tmp_path / "run")
    other = synthetic_dir(tmp_path, train=96, test=64)
    code, _, err = cnm(["train", "--out", run, "--resume", "--data", other, "--epochs", EPOCHS + 1], capsys)
    one_error(code, err, f"{other}: these data differ from the ones {run} was trained on",
              f"--resume --data {other} --allow-new-data")
    code, _, err = cnm(["train", "--data", other, "--allow-new-data"], capsys)
    one_error(code, err, "--allow-new-data needs --resume")
    old = os.umask(0o027)
    try:
        code, out, err = cnm(["train", "--out", run, "--resume", "--quiet", "--data", other, "--allow-new-data",
                              "--epochs", EPOCHS + 1], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert f"extending from {EPOCHS} to {EPOCHS + 1} epochs" in out and "best.pt restarts" in out
    assert ckpt.load_checkpoint(run / "best.pt")["epoch"] == EPOCHS + 1
    # 8: every file this run wrote is group-readable as the umask allows (0o640 here)
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("value,msg", [("1e20", "--seed must be an integer, got '1e20'"),
                                       (str(2 ** 64 - 1), "--seed must be an integer in [0, 2**63)")])
def test_a_bad_seed_is_one_line(value, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cnm(["train", "--seed", value], capsys)
    one_error(code, err, msg)


def _read_until(fd, text: str, seen: bytearray) -> None:
    """Read the terminal `fd` until `text` appeared (or EOF: the child ended)."""
    while text.encode() not in seen:
        try:
            chunk = os.read(fd, 4096)
        except OSError:                          # EIO: the child closed the terminal
            return
        if not chunk:
            return
        seen += chunk


def test_sigterm_on_a_terminal_stops_the_bar_and_restores_the_cursor(data, tmp_path):
    """On a terminal (a pty) the run draws rich bars; SIGTERM mid-epoch removes the bar and shows
    the cursor again before the stop message (no half-drawn bar, no hidden cursor)."""
    run = tmp_path / "run"
    argv = [a for a in _cli(data, run) if a != "--quiet"]
    leader, follower = pty.openpty()
    a = subprocess.Popen(argv, cwd=ROOT, env={**ENV, "TERM": "xterm-256color", "COLUMNS": "100"},
                         stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = bytearray()
    try:
        _read_until(leader, f"epoch 1/{EPOCHS}  lr", seen)       # epoch 1's line: now in epoch 2
        assert a.poll() is None, seen.decode(errors="replace")
        a.send_signal(signal.SIGTERM)
        _read_until(leader, "\x00never\x00", seen)              # everything, to the end
        a.wait(timeout=120)
    finally:
        a.kill()
        a.wait()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert a.returncode == 143 and "Traceback" not in text, text
    hide, show = text.rfind("\x1b[?25l"), text.rfind("\x1b[?25h")
    assert 0 <= hide < show < text.index("stopped by SIGTERM"), text   # the bar was drawn, then removed
    assert f"to continue: cnm train --out {run} --resume" in text
