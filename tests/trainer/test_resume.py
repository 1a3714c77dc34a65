"""--resume: a resumed run yields the metrics of an uninterrupted one (CPU, fixed seed), after a
clean stop and after `kill -9` in the middle of an epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import CnmError
from tests.trainer.test_loop import synthetic_dir, tiny
from trainer import checkpoint as ckpt
from trainer.loop import train

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"images_per_s", "epoch_s", "eval_s"}
EPOCHS = 3
# ramp and cosine make every epoch's loss weights and lr differ
SETTINGS = {"arch": "resnet20", "peers": 2, "batch_size": 32, "epochs": EPOCHS, "schedule": "cosine",
            "rampup_epochs": 2.0}


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_dir(tmp_path_factory.mktemp("data"), train=128, test=64)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Metrics of the uninterrupted run."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(tiny(data, run, **SETTINGS))
    return _strip(ckpt.read_jsonl(run / "metrics.jsonl"))


@pytest.fixture(scope="module")
def reference_run(reference, tmp_path_factory):
    return next(Path(tmp_path_factory.getbasetemp()).glob("ref*/run"))


def test_resume_after_a_stop_equals_uninterrupted(data, reference, tmp_path, monkeypatch):
    from trainer import progress

    run = tmp_path / "run"
    real = progress.Progress.report

    def stop_after_first_epoch(self, row):
        real(self, row)
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.Progress, "report", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, run, **SETTINGS))
    monkeypatch.setattr(progress.Progress, "report", real)
    assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
    # a torn line (a crash inside the write) is dropped on resume
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr"')
    train(tiny(data, run, resume=True, **{k: v for k, v in SETTINGS.items() if k == "epochs"}),
          explicit={"resume", "out", "epochs"})
    assert _strip(ckpt.read_jsonl(run / "metrics.jsonl")) == reference


def test_resume_errors(data, tmp_path, reference_run):
    with pytest.raises(CnmError, match="no last.pt to resume from"):
        train(tiny(data, tmp_path / "nothing", resume=True))
    with pytest.raises(CnmError, match="--resume needs --out"):
        train(tiny(data, None, resume=True))
    with pytest.raises(CnmError, match="--arch resnet32 does not match the checkpoint's resnet20"):
        train(tiny(data, reference_run, resume=True, arch="resnet32"), explicit={"arch", "resume", "out"})
    with pytest.raises(CnmError, match="--peers 3 does not match the checkpoint's 2"):
        train(tiny(data, reference_run, resume=True, peers=3), explicit={"peers", "resume", "out"})
    # resuming a finished run trains nothing and reports its last epoch
    result = train(tiny(data, reference_run, resume=True), explicit={"resume", "out"})
    assert result["last"]["epoch"] == EPOCHS


def _cli(data, run, *extra):
    args = [sys.executable, "-m", "cnm", "train", "--data", str(data), "--out", str(run), "--quiet",
            "--device", "cpu"]
    for k, v in SETTINGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + list(extra)


def test_resume_after_kill_9_mid_epoch_equals_uninterrupted(data, reference, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_cli(data, run), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        # epoch 1 finished: its row, then its checkpoint (renamed into place: present = complete)
        while not (any(r.get("epoch") == 1 for r in ckpt.read_jsonl(run / "metrics.jsonl"))
                   and (run / "last.pt").exists()):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "epoch 1 never finished"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rows_at_kill = ckpt.read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows_at_kill] == [1], "the kill did not land in epoch 2"
    ckpt.load_checkpoint(run / "last.pt")     # intact after the kill
    out = subprocess.run(_cli(data, run, "--resume"), check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    assert _strip(ckpt.read_jsonl(run / "metrics.jsonl")) == reference
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"], \
        "temporary files left behind"
