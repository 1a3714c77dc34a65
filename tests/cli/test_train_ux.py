"""What a researcher expects of `cnm train` (issue 14), through the CLI on tiny CPU runs: the banner
and the time left, the long-CPU-run note (fake clock), TensorBoard event files equal to
metrics.jsonl, the run record and `--config RUN/config.json` repeating a run exactly,
`--eval-every`, `--rampup-epochs auto`, and the hints for missing data and `--resume`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import pytest
import torch

from cnm.cli import main
from pipeline import backends
from pipeline.data.manifest import write_dataset
from pipeline.data.synthetic import class_names, make_synthetic
from pipeline.environment import git_info
from tests.cli.clirun import run_main
from trainer import progress as prog
from trainer import tblog
from trainer.checkpoint import load_checkpoint, read_jsonl
from trainer.losses import rampup

TIMING = ("images_per_s", "epoch_s", "eval_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic set (10 classes) in a folder called cifar100, as a user might name it."""
    out = tmp_path_factory.mktemp("ux") / "cifar100"
    write_dataset(out, make_synthetic(10, 64, 32, seed=0), dataset="synthetic", class_names=class_names(10),
                  beton=False)
    return out


def train_args(data, *extra):
    return ["train", "--data", str(data), "--arch", "resnet20", "--peers", "2", "--batch-size", "16",
            "--limit-train", "32", "--device", "cpu", "--loader", "resident", "--quiet", *extra]


@pytest.fixture(scope="module")
def sparse_run(data, tmp_path_factory):
    """3 epochs, evaluated every 2nd (and the last), logged to TensorBoard every step."""
    run = tmp_path_factory.mktemp("sparse") / "run"
    with pytest.raises(SystemExit) as e:
        main(train_args(data, "--epochs", "3", "--eval-every", "2", "--log", "tensorboard", "--log-every", "1",
                        "--out", str(run)))
    assert e.value.code == 0
    return run


def test_banner_names_the_dataset_and_lines_show_the_time_left(data, tmp_path, capsys):
    code, out, err = run_main(train_args(data, "--epochs", "2", "--out", str(tmp_path / "r")), capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"run {tmp_path / 'r'}: 2 x resnet20 (loop) on cpu; data {data} (synthetic, 10 classes)")
    assert "32 train images/epoch" in lines[0] and "2 epochs" in lines[0]
    assert lines[1].startswith("epoch 1/2 ") and " run 1/2 done, " in lines[1] and lines[1].endswith(" left")
    assert lines[2].startswith("epoch 2/2 ") and lines[2].endswith("run 2/2 done, 0s left")
    assert "note:" not in out                     # seconds, not hours
    assert not (tmp_path / "r" / "tensorboard").exists()      # TensorBoard is off by default


def test_long_cpu_run_note_with_a_fake_clock(data, tmp_path, capsys, monkeypatch):
    """Every reading of the progress clock advances it by 1000 s: the run looks hours long, so
    the note comes once (during the first epoch), naming the flags that shorten a run."""
    t = [0.0]

    def fake_clock():
        t[0] += 1000.0
        return t[0]

    monkeypatch.setattr(prog, "_now", fake_clock)
    code, out, err = run_main(train_args(data, "--epochs", "3", "--teacher", "none", "--out", str(tmp_path / "r")),
                              capsys)
    assert code == 0, err
    lines = out.splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("note: on the CPU this run needs about ")]
    assert len(notes) == 1 and notes[0] == 1, out          # right after the banner, before epoch 1's line
    for flag in ("--epochs", "--limit-train", "--arch"):
        assert flag in lines[1]
    # the clock is read at the epoch's start, after each of its 2 steps (the first one's set-up
    # left out: the note comes after the second, 2 x 1000 s per epoch from the step rate) and at
    # its report: 3000 s per epoch, 2 epochs left
    assert "(3 epochs left at about 33m20s each)" in lines[1], lines[1]
    assert lines[2].startswith("epoch 1/3 ") and lines[2].endswith("run 1/3 done, 1h40m left")
    assert rows_of(tmp_path / "r")[0]["epoch_s"] < 1000     # the metrics keep the real clock


def rows_of(run):
    return read_jsonl(run / "metrics.jsonl")


def test_eval_every_and_best_from_evaluated_epochs(sparse_run):
    rows = rows_of(sparse_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["test_acc"] is None and rows[0]["ensemble_acc"] is None and rows[0]["teacher_acc"] is None
    assert rows[0]["eval_s"] == 0.0 and rows[0]["loss"] > 0 and len(rows[0]["train_acc"]) == 2
    for r in rows[1:]:                            # epoch 2 (every 2nd) and 3 (the last)
        assert len(r["test_acc"]) == 2 and r["ensemble_acc"] is not None and r["eval_s"] > 0
    best = load_checkpoint(sparse_run / "best.pt")
    best_epoch = 2 if rows[1]["ensemble_acc"] >= rows[2]["ensemble_acc"] else 3
    assert best["epoch"] == best_epoch and best["best"]["ensemble_acc"] == rows[best_epoch - 1]["ensemble_acc"]


def test_rampup_auto_scales_to_the_epochs(sparse_run, data, tmp_path, capsys):
    cfg = json.loads((sparse_run / "config.json").read_text())
    assert cfg["rampup_epochs"] == pytest.approx(80 / 300 * 3)   # resolved: 0.8
    rows = rows_of(sparse_run)
    assert [r["ramp"] for r in rows] == pytest.approx([float(rampup(e, 0.8)) for e in range(3)])
    assert rows[0]["ramp"] == pytest.approx(math.exp(-5)) and rows[1]["ramp"] == 1.0
    code, _, err = run_main(train_args(data, "--rampup-epochs", "soon"), capsys)
    assert code == 1 and err == "error: --rampup-epochs must be a number or auto, got 'soon'\n"


def test_tensorboard_events_equal_the_metrics(sparse_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(sparse_run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rows = rows_of(sparse_run)
    logged = {tag: {ev.step: ev.value for ev in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for tag, value in tblog.scalars(row).items():
            expected.setdefault(tag, {})[row["epoch"]] = value
    assert set(logged) - {tblog.STEP_LOSS_TAG} == set(expected)
    for tag, by_epoch in expected.items():
        assert logged[tag] == pytest.approx(by_epoch, rel=1e-6), tag
    assert sorted(logged["test/ensemble_acc"]) == [2, 3]          # epoch 1 was not evaluated
    assert "loss/kd" in logged and "test/teacher_acc_peer2" in logged and "opt/ramp" in logged
    # --log-every 1: every step's total loss; the mean over an epoch's steps is its row's loss
    steps = logged[tblog.STEP_LOSS_TAG]
    assert sorted(steps) == [r for r in range(1, 7)]              # 2 steps x 3 epochs
    for row in rows:
        g = row["global_step"]
        assert (steps[g - 1] + steps[g]) / 2 == pytest.approx(row["loss"], rel=1e-5)
    start = HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["arch"].string_value == "resnet20" and start.hparams["eval_every"].number_value == 2
    assert start.hparams["rampup_epochs"].number_value == pytest.approx(0.8)
    assert start.hparams["record.device"].string_value == "cpu"


def test_run_record_and_config_json_repeats_the_run(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    code, _, err = run_main(train_args(data, "--epochs", "2", "--mix", "cutmix", "--out", str(first)), capsys)
    assert code == 0, err
    cfg = json.loads((first / "config.json").read_text())
    rec = cfg["_record"]
    assert rec["command"] == (f"cnm train --data {data} --arch resnet20 --peers 2 --epochs 2 --batch-size 16 "
                              f"--mix cutmix --loader resident --device cpu --limit-train 32 --out {first} --quiet")
    assert rec["cnm_version"] == "0.1.0" and rec["torch"] == torch.__version__ and rec["cuda"] == torch.version.cuda
    assert rec["device"] == "cpu" and rec["device_name"] and "cudnn" in rec
    assert rec["git_commit"] == (git_info() or {}).get("commit")
    assert rec["manifest_sha256"] == hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
    # the recorded config repeats the run: every metric of every epoch, timing aside
    again = tmp_path / "again"
    code, _, err = run_main(["train", "--config", str(first / "config.json"), "--out", str(again)], capsys)
    assert code == 0, err
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in rows_of(first)]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_of(again)] == strip
    cfg2 = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in cfg2.items() if k not in ("out", "_record")} == \
        {k: v for k, v in cfg.items() if k not in ("out", "_record")}
    assert cfg2["_record"]["command"] == f"cnm train --config {first / 'config.json'} --out {again}"
    # without --out: a new run directory under runs/ (the recorded `out` names the old run)
    code, _, err = run_main(["train", "--config", str(first / "config.json"), "--epochs", "1"], capsys)
    assert code == 0, err
    made = list((tmp_path / "runs").iterdir())
    assert len(made) == 1 and made[0].name.startswith("resnet20-p2-") and len(rows_of(made[0])) == 1


def test_missing_data_names_the_prepare_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["train", "--data", "mydata/cifar100"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "`cnm prepare --dataset cifar100 --download --out mydata/cifar100`" in err
    assert "--dataset synthetic" in err


def test_resume_without_out_names_the_latest_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["train", "--resume"], capsys)
    assert code == 1 and err == "error: --resume needs --out RUN (the run directory to continue)\n"
    for i, name in enumerate(("resnet32-p3-20260101-000000", "resnet20-p2-20260102-000000", "no-checkpoint")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        if name != "no-checkpoint":
            (tmp_path / "runs" / name / "last.pt").write_bytes(b"x")
            os.utime(tmp_path / "runs" / name / "last.pt", (1000 + i, 1000 + i))
    code, _, err = run_main(["train", "--resume"], capsys)
    latest = os.path.join("runs", "resnet20-p2-20260102-000000")
    assert code == 1 and err == (f"error: --resume needs --out RUN (the run directory to continue); the most "
                                 f"recent run is {latest}: --resume --out {latest}\n")


def test_log_tensorboard_without_the_package_is_one_line_before_anything_is_written(data, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    backends.reset_cache()
    try:
        code, _, err = run_main(train_args(data, "--log", "tensorboard", "--out", str(tmp_path / "r")), capsys)
    finally:
        backends.reset_cache()
    assert code == 1 and err == ("error: tensorboard is not installed (needed for --log tensorboard): "
                                 "pip install 'cnm[tensorboard]'\n")
    assert not (tmp_path / "r").exists()
