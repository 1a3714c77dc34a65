"""The loop: run directory layout, metrics rows, checkpoints, schedule, NaN stop, --limit-train,
and the evidence that training learns (synthetic set, CPU, well under 2 minutes)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.manifest import write_dataset
from pipeline.data.synthetic import class_names, make_synthetic
from pipeline.errors import CnmError
from trainer import checkpoint as ckpt
from trainer.config import make_config
from trainer.loop import train

ROW_KEYS = {"epoch", "lr", "ramp", "loss", "ce", "kd", "fml", "train_acc", "test_acc", "ensemble_acc",
            "teacher_acc", "teacher_ensemble_acc", "disagreement", "images_per_s", "epoch_s", "eval_s",
            "global_step"}


def synthetic_dir(root, classes=10, train=128, test=64):
    out = root / f"syn{classes}-{train}-{test}"
    if not out.exists():
        write_dataset(out, make_synthetic(classes, train, test, seed=0), dataset="synthetic",
                      class_names=class_names(classes), beton=False)
    return out


def tiny(data, out, **kw):
    base = {"data": str(data), "out": None if out is None else str(out), "arch": "resnet20", "peers": 2,
            "batch_size": 32, "epochs": 2, "quiet": True, "device": "cpu"}
    base.update(kw)
    return make_config(None, base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_dir(tmp_path_factory.mktemp("data"))


def test_run_layout_metrics_and_checkpoints(data, tmp_path):
    run = tmp_path / "run"
    result = train(tiny(data, run, epochs=2))
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.json", "last.pt",
                                                     "metrics.jsonl", "prev.pt"]
    assert ckpt.load_checkpoint(run / "prev.pt")["epoch"] == 1       # the last.pt it replaced
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["peer_exec"] == "loop" and cfg["device"] == "cpu" and cfg["bf16"] == "off"
    assert cfg["cuda_graphs"] == "off" and cfg["peers"] == 2 and cfg["_resolved"]["loader"] == "resident"
    assert cfg["_resolved"]["steps_per_epoch"] == 4
    rows = ckpt.read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows == result["rows"]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert len(r["train_acc"]) == len(r["test_acc"]) == len(r["teacher_acc"]) == 2
        assert all(0 <= a <= 100 for a in r["test_acc"] + r["teacher_acc"])
        assert r["images_per_s"] > 0 and r["epoch_s"] > 0
    assert [r["lr"] for r in rows] == [0.1, 0.01]          # x0.1 at 50% of 2 epochs
    assert [r["global_step"] for r in rows] == [4, 8]
    assert rows[0]["ramp"] == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    state = ckpt.load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["global_step"] == 8 and state["archs"] == ["resnet20"] * 2
    assert len(state["peers"]) == len(state["teacher"]) == len(state["optimizer"]["momentum"]) == 2
    assert state["optimizer"]["momentum"][0].keys() == state["peers"][0].keys() - {
        k for k in state["peers"][0] if "running" in k or "num_batches" in k}
    best = ckpt.load_checkpoint(run / "best.pt")
    assert best["best"]["ensemble_acc"] == max(r["ensemble_acc"] for r in rows)
    # a second run into the same directory is refused (it would mix two runs)
    with pytest.raises(CnmError, match="already holds a run"):
        train(tiny(data, run))


def test_peers_teacher_and_no_kd_runs_have_no_teacher_columns(data, tmp_path):
    run = tmp_path / "run"
    train(tiny(data, run, epochs=1, teacher="peers", mix="cutmix", schedule="cosine", limit_train=64))
    (row,) = ckpt.read_jsonl(run / "metrics.jsonl")
    assert row["teacher_acc"] is None and row["teacher_ensemble_acc"] is None
    assert row["global_step"] == 2                          # --limit-train 64 at batch 32
    assert json.loads((run / "config.json").read_text())["_resolved"]["train_images"] == 64


def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(data, tmp_path, monkeypatch):
    from trainer import loop

    real = loop.rampup_weight
    monkeypatch.setattr(loop, "rampup_weight", lambda e, r: float("nan") if e == 1 else real(e, r))
    run = tmp_path / "run"
    with pytest.raises(CnmError) as e:
        train(tiny(data, run, epochs=3, limit_train=64))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("non-finite loss at epoch 2, step 1")
    assert "last good checkpoint" in msg
    assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in ckpt.read_jsonl(run / "metrics.jsonl")] == [1]


def test_synthetic_run_learns_far_above_chance(tmp_path_factory, tmp_path):
    """Evidence that the trainer learns: 10-class synthetic set (chance 10%), two resnet20 peers,
    the full recipe (Cut^nMix, EMA teacher, FML), 3 epochs of 768 images, CPU: about 35 s of CPU
    time (reached an 84% ensemble when measured; asserted: 40%). The distillation ramp is held at
    80 epochs, so these 3 epochs test learning; what the distillation terms do at short budgets
    (they cost accuracy: issue 15) is measured by bench/ablation.py (docs/design.md#evidence)."""
    data = synthetic_dir(tmp_path_factory.mktemp("learn"), classes=10, train=768, test=256)
    result = train(tiny(data, tmp_path / "run", epochs=3, batch_size=64, lr=0.05, rampup_epochs=80.0))
    last = result["last"]
    assert last["ensemble_acc"] >= 40.0, last            # chance is 10%
    assert max(last["test_acc"]) >= 35.0, last


def test_progress_bar_and_summary_table_on_a_terminal(data, tmp_path):
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    cfg = tiny(data, tmp_path / "run", epochs=1, limit_train=64, quiet=False)
    train(cfg, console=console)
    text = buf.getvalue()
    assert "epoch 1/1" in text and "img/s" in text                       # the bar and the line
    assert "ensemble (mean softmax)" in text and "EMA teacher acc %" in text  # the summary table
    assert "peer 1 (resnet20)" in text


@pytest.mark.gpu
def test_cuda_run_learns_without_host_sync_inside_epochs(tmp_path_factory, tmp_path, monkeypatch, cuda_device):
    """The CUDA defaults (grouped, bf16, channels-last, CUDA graph, resident loader): from the
    second epoch on (the first captures the graph) any host sync inside an epoch is an error."""
    from trainer.step import TrainStep

    data = synthetic_dir(tmp_path_factory.mktemp("learn-gpu"), classes=10, train=2048, test=512)
    real_ramp, real_read = TrainStep.set_ramp, TrainStep.read_metrics
    epochs_started = []

    def set_ramp(self, w):
        real_ramp(self, w)
        epochs_started.append(w)
        if len(epochs_started) > 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def read_metrics(self):
        torch.cuda.set_sync_debug_mode("default")
        return real_read(self)

    monkeypatch.setattr(TrainStep, "set_ramp", set_ramp)
    monkeypatch.setattr(TrainStep, "read_metrics", read_metrics)
    try:
        result = train(tiny(data, tmp_path / "run", device="auto", epochs=4, batch_size=64, lr=0.05))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["peer_exec"], cfg["bf16"], cfg["channels_last"], cfg["cuda_graphs"]) == ("grouped", "on", "on", "on")
    assert result["last"]["ensemble_acc"] >= 40.0, result["last"]
