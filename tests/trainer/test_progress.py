"""The whole-run time left and the one long-CPU-run note of trainer/progress.py, on a fake clock."""

from __future__ import annotations

import pytest
import torch

from trainer import progress as prog
from trainer.progress import WARN_AFTER_S, Progress, RunClock, duration, epoch_line


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("s,text", [(0, "0s"), (45.4, "45s"), (725, "12m05s"), (35880, "9h58m"),
                                    (3 * 86400 + 4 * 3600 + 59, "3d04h")])
def test_duration(s, text):
    assert duration(s) == text


def test_run_clock_from_steps_then_from_epochs():
    c = RunClock(300)
    c.start_epoch(0, 10, now=0.0)
    assert c.left(0, 5.0) is None and c.text(0, 5.0) == "run 0/300 done, measuring"
    # 2 steps in 20 s: 100 s per epoch (no evaluation measured yet); 80 s of this epoch + 299 more
    assert c.left(2, 20.0) == pytest.approx(80 + 299 * 100)
    c.end_epoch(now=120.0)                        # training, evaluation and saving: 120 s
    assert c.per_epoch(10, 120.0) == pytest.approx(120.0)
    assert c.left(10, 120.0) == pytest.approx(299 * 120) and c.text(10, 120.0) == "run 1/300 done, 9h58m left"
    c.start_epoch(1, 10, now=120.0)
    c.end_epoch(now=200.0)                        # the mean over both epochs: 100 s
    assert c.left(10, 200.0) == pytest.approx(298 * 100)


def test_run_clock_leaves_the_first_steps_set_up_out():
    """A first step that pays 30 s of set-up, then 1 s steps: the estimate is 10 s per epoch,
    not (31 + 1) / 2 x 10 = 160 s; with only the first step done there is no estimate yet."""
    c = RunClock(300)
    c.start_epoch(0, 10, now=0.0)
    c.mark_first_step(30.0)
    assert c.per_epoch(1, 30.0) is None and c.text(1, 30.0) == "run 0/300 done, measuring"
    assert c.per_epoch(3, 32.0) == pytest.approx(10.0)
    c.mark_first_step(40.0)                      # only the first mark counts
    assert c.per_epoch(3, 32.0) == pytest.approx(10.0)
    c.end_epoch(now=50.0)                        # then whole epochs, set-up included
    assert c.per_epoch(10, 50.0) == pytest.approx(50.0)


def test_resumed_run_counts_the_epochs_before_it():
    c = RunClock(10)
    c.start_epoch(7, 4, now=50.0)                 # resumed at epoch 8: 3 epochs left
    c.end_epoch(now=80.0)
    assert c.text(4, 80.0) == "run 8/10 done, 1m00s left"


def _epoch(p: Progress, clock: FakeClock, epoch: int, steps: int, step_s: float, device: str):
    z = torch.zeros(())
    p.start_epoch(epoch, steps, 16, torch.device(device))
    for i in range(steps):
        clock.t += step_s
        p.step(i, z, torch.zeros(()))
    p.end_epoch()
    clock.t += step_s                            # evaluation and saving
    p.report({"epoch": epoch + 1, "lr": 0.1, "loss": 1.0, "ce": 1.0, "kd": 0.0, "fml": 0.0, "train_acc": [1.0],
              "test_acc": None, "ensemble_acc": None, "images_per_s": 1.0, "epoch_s": 1.0})


def test_long_cpu_run_is_noted_once_with_the_flags(monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(prog, "_now", clock)
    p = Progress(epochs=300, quiet=True)
    steps, step_s = 10, 5.0                       # 55 s per epoch with evaluation, 300 epochs: 4.6 h
    _epoch(p, clock, 0, steps, step_s, "cpu")
    out = capsys.readouterr().out.splitlines()
    # the note comes during the first epoch, once WARN_AFTER_S of it has run (2 steps: 10 s)
    assert out[0].startswith("note: on the CPU this run needs about ") and len(out) == 2
    assert WARN_AFTER_S == 10.0 and "(300 epochs left at about 50s each)" in out[0]
    assert "4h09m" in out[0]                      # 8 steps x 5 s + 299 x 50 s, from the step rate
    for flag in ("--epochs", "--limit-train", "--arch"):
        assert flag in out[0]
    assert out[1].startswith("epoch 1/300 ") and "test -" in out[1]
    assert out[1].endswith("run 1/300 done, 4h34m left")        # 299 epochs x 55 s, measured
    for e in (1, 2):
        _epoch(p, clock, e, steps, step_s, "cpu")
    out = capsys.readouterr().out
    assert "note:" not in out and out.count("\n") == 2 and "run 3/300 done, 4h32m left" in out


@pytest.mark.parametrize("device,epochs", [("cuda", 300), ("cpu", 60)])
def test_no_note_on_a_gpu_or_under_an_hour(monkeypatch, capsys, device, epochs):
    clock = FakeClock()
    monkeypatch.setattr(prog, "_now", clock)
    p = Progress(epochs=epochs, quiet=True)        # 60 x 55 s = 55 min on the CPU
    for e in range(2):
        _epoch(p, clock, e, 10, 5.0, device)
    out = capsys.readouterr().out
    assert "note:" not in out and out.count("\n") == 2
    assert f"run 2/{epochs} done, {duration((epochs - 2) * 55.0)} left" in out


def test_epoch_line_of_an_epoch_not_evaluated():
    row = {"epoch": 2, "lr": 0.1, "loss": 1.0, "ce": 1.0, "kd": 0.5, "fml": 0.25, "train_acc": [10.0, 20.0],
           "test_acc": None, "ensemble_acc": None, "teacher_ensemble_acc": None, "images_per_s": 100.0,
           "epoch_s": 2.0}
    assert "train 10.0/20.0  test -  100 img/s" in epoch_line(row, 5)
    row.update(test_acc=[30.0, 40.0], ensemble_acc=45.0, teacher_ensemble_acc=46.0)
    assert "test 30.00/40.00  ens 45.00  teacher-ens 46.00" in epoch_line(row, 5)


def test_summary_reads_the_last_evaluated_epoch(capsys):
    p = Progress(epochs=3, quiet=True)
    evaluated = {"epoch": 2, "test_acc": [30.0], "ensemble_acc": 31.0, "teacher_ensemble_acc": None, "epoch_s": 1.0}
    skipped = {"epoch": 3, "test_acc": None, "ensemble_acc": None, "teacher_ensemble_acc": None, "epoch_s": 1.0}
    p.summary([evaluated, skipped], {"epoch": 2, "ensemble_acc": 31.0}, "runs/x")
    p.summary([skipped], None, "runs/y")
    assert capsys.readouterr().out.splitlines() == [
        "done: runs/x  final ensemble 31.00%  best ensemble 31.00% (epoch 2)", "done: runs/y  (no evaluated epoch)"]
