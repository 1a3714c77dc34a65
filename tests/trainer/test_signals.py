"""trainer/signals.py with real signals: SIGTERM/SIGINT to a child in the middle of a step let
the step finish, run its clean-up, print where the run is and how to resume it, exit 143/130; a
second signal abandons the step at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trainer.signals import Interrupted, graceful_stop, resume_hint

ROOT = Path(__file__).resolve().parents[2]

# A "training loop" whose every step waits for a line on stdin, so the test decides when the
# step in progress ends. Each finished step is recorded atomically in RUN/steps.
LOOP = """
import sys
from pathlib import Path
from pipeline.fileio import atomic_write_text
from trainer.signals import graceful_stop, resume_hint
run = Path(sys.argv[1])
done = 0
with graceful_stop(lambda: resume_hint(run, done, 10)) as stop:
    try:
        while True:
            stop.check()
            print("in step", done + 1, flush=True)
            sys.stdin.readline()
            done += 1
            atomic_write_text(run / "steps", str(done))
    finally:
        print("bar stopped", flush=True)
"""


def _start(run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOOP, str(run)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_then_stops_with_the_resume_command(tmp_path, sig, code):
    child = _start(tmp_path)
    try:
        assert child.stdout.readline() == "in step 1\n"
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "in step 2\n"
        child.send_signal(sig)
        # the handler has run (it says so) while step 2 is still waiting: now let step 2 end
        assert child.stderr.readline() == "\n"
        assert child.stderr.readline().startswith(f"{sig.name}: stopping at the end of the current step")
        child.stdin.write("\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code
    assert out == "bar stopped\n"                      # no step 3 was started
    assert (tmp_path / "steps").read_text() == "2"      # step 2 was finished and written
    assert err == (f"stopped by {sig.name}\n{tmp_path}: stopped after epoch 2/10 (last.pt holds "
                   f"epoch 2); to continue: cnm train --out {tmp_path} --resume\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps"]   # no temporary file left


def test_a_second_signal_abandons_the_step_at_once(tmp_path):
    child = _start(tmp_path)
    try:
        assert child.stdout.readline() == "in step 1\n"
        child.send_signal(signal.SIGTERM)
        child.stderr.readline()
        assert child.stderr.readline().startswith("SIGTERM: stopping")
        child.send_signal(signal.SIGTERM)                # step 1 never gets its line
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143 and out == "bar stopped\n" and "Traceback" not in err
    assert err.endswith(f"stopped in epoch 1/10, before the first checkpoint; to start it again "
                        f"with its settings: cnm train --out {tmp_path} --resume\n")
    assert not (tmp_path / "steps").exists()


# DataLoader worker processes (forked inside the block) and a scheduler that signals the whole
# process group (slurm's scancel, Ctrl-C in a terminal)
LOADER = """
import sys, time
from torch.utils.data import DataLoader
from trainer.signals import graceful_stop
loader = DataLoader(range(10 ** 6), batch_size=1, num_workers=2, persistent_workers=True)
with graceful_stop(lambda: "where") as stop:
    for i, batch in enumerate(loader):
        if i == 3:
            print("ready", flush=True)
        time.sleep(0.005)
        stop.check()
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_group_with_loader_workers(sig, code):
    child = subprocess.Popen([sys.executable, "-c", LOADER], cwd=ROOT, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        os.killpg(child.pid, sig)
        _out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == code and "Traceback" not in err, err
    assert err.count("stopping at the end of the current step") == 1     # the workers stay quiet
    lines = err.strip().splitlines()
    assert lines[-2].startswith(f"stopped by {sig.name}") and lines[-1] == "where", err
    if sig == signal.SIGTERM:  # torch's workers die of it; the loader's error is named, in one line
        assert "(while stopping: RuntimeError: DataLoader worker" in lines[-2] or lines[-2] == "stopped by SIGTERM"


def test_an_error_without_a_signal_is_not_swallowed():
    with pytest.raises(ValueError, match="real"), graceful_stop():
        raise ValueError("real")


def test_in_process_flag_exit_code_and_handlers_restored(capfd):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e, graceful_stop(lambda: "where") as stop:
        stop.check()                                    # nothing yet
        signal.raise_signal(signal.SIGTERM)             # its handler runs before this returns
        assert stop.requested and stop.signum == signal.SIGTERM
        stop.check()
        raise AssertionError("check() did not raise")
    assert e.value.code == 143
    assert capfd.readouterr().err == ("\nSIGTERM: stopping at the end of the current step (send it "
                                      "again to stop at once)\nstopped by SIGTERM\nwhere\n")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with graceful_stop(report=False) as stop:           # a normal end restores them too
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with pytest.raises(SystemExit) as e, graceful_stop(lambda: "x", report=False) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        raise Interrupted(signal.SIGINT)
    assert e.value.code == 130 and capfd.readouterr().err == ""


def test_outside_the_main_thread_it_is_a_plain_block():
    seen = []

    def body():
        with graceful_stop() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGTERM) != stop._handle))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [(False, True)]


def test_resume_hint_lines():
    assert resume_hint("runs/a b", 3, 10) == ("runs/a b: stopped after epoch 3/10 (last.pt holds epoch 3); "
                                              "to continue: cnm train --out 'runs/a b' --resume")
    assert resume_hint("r", 0, 5).endswith("before the first checkpoint; to start it again with its "
                                           "settings: cnm train --out r --resume")
    assert resume_hint("r", 5, 5) == "r: all 5 epochs are done; to train longer: cnm train --out r --resume --epochs N"
