"""trainer.tblog: the device loss buffer records without a host sync and reads back in order;
TensorBoard event files written for a few realistic epochs read back (tensorboard's own
EventAccumulator) equal to the metrics rows, the per-step loss blocks and the config hparams."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pipeline import backends
from pipeline.errors import CnmError
from tests.syncdetect import SyncDetector
from tests.trainer.test_loop import ROW_KEYS
from trainer import tblog


def test_buffer_records_without_a_sync_and_reads_in_order():
    buf = tblog.StepLossBuffer(4, "cpu")
    gstep = torch.zeros((), dtype=torch.int64)
    losses = torch.arange(1, 11, dtype=torch.float32) / 7
    with SyncDetector() as det:
        for i in range(3):
            gstep += 1
            buf.record(losses[i].to(torch.bfloat16).float() * 1.0, gstep)
    assert det.ops == []
    steps, vals, dropped = buf.read()
    assert steps.tolist() == [1, 2, 3] and dropped == 0
    np.testing.assert_array_equal(vals, losses[:3].to(torch.bfloat16).float().numpy())
    assert buf.read()[0].size == 0                              # empty after a read
    for i in range(3, 10):                                      # 7 entries into 4 places
        gstep += 1
        buf.record(losses[i], gstep)
    steps, vals, dropped = buf.read()
    assert steps.tolist() == [7, 8, 9, 10] and dropped == 3
    np.testing.assert_array_equal(vals, losses[6:].numpy())


def fake_rows(epochs: int, peers: int, steps_per_epoch: int, seed: int = 0) -> list[dict]:
    """Metrics rows with the keys and value ranges of a real metrics.jsonl row."""
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(1, epochs + 1):
        test = rng.uniform(20, 60, peers).round(2).tolist()
        rows.append({"epoch": e, "lr": 0.1 if e <= epochs // 2 else 0.01,
                     "ramp": float(np.exp(-5 * (1 - e / epochs) ** 2)), "loss": float(rng.uniform(3, 6)),
                     "ce": float(rng.uniform(1, 2.5)), "kd": float(rng.uniform(0, 3)), "fml": float(rng.uniform(0, .4)),
                     "train_acc": rng.uniform(10, 50, peers).tolist(), "test_acc": test,
                     "ensemble_acc": max(test) + 1.0, "teacher_acc": rng.uniform(20, 60, peers).tolist(),
                     "teacher_ensemble_acc": float(rng.uniform(20, 60)),
                     "disagreement": float(rng.uniform(0, 40)),
                     "images_per_s": float(rng.uniform(50, 5000)), "epoch_s": float(rng.uniform(1, 9)),
                     "eval_s": float(rng.uniform(0.1, 1)), "global_step": e * steps_per_epoch})
    return rows


CONFIG = {"data": "data/cifar100", "arch": "resnet20", "peers": 2, "epochs": 3, "lr": 0.1, "nesterov": True,
          "limit_train": None, "mix": "cutnmix", "_resolved": {"loader": "resident", "num_classes": 10}}


def test_events_read_back_equal_to_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    P, S, N = 2, 5, 3
    rows = fake_rows(3, P, S)
    assert set(rows[0]) == ROW_KEYS                               # the loop's row, key for key
    rows[1]["teacher_acc"] = rows[1]["teacher_ensemble_acc"] = None   # e.g. a run without a teacher
    step_loss = np.random.default_rng(1).uniform(2, 8, 3 * S).astype(np.float32)
    log = tblog.TensorBoardLog(tmp_path / "tb", loss_every=N)
    log.hparams(CONFIG)
    buf = tblog.StepLossBuffer(S, "cpu")
    gstep = torch.zeros((), dtype=torch.int64)
    for e, row in enumerate(rows):
        for i in range(S):
            gstep += 1
            buf.record(torch.tensor(step_loss[e * S + i]), gstep)
        assert log.epoch(row, buf) == 0
    log.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for row in rows:
        expect = {"opt/lr": row["lr"], "opt/ramp": row["ramp"], "loss/total": row["loss"], "loss/ce": row["ce"],
                  "loss/kd": row["kd"], "loss/fml": row["fml"], "test/ensemble_acc": row["ensemble_acc"],
                  "test/disagreement": row["disagreement"], "speed/images_per_s": row["images_per_s"],
                  "time/epoch_s": row["epoch_s"], "time/eval_s": row["eval_s"]}
        for k in range(P):
            expect[f"test/acc_peer{k + 1}"] = row["test_acc"][k]
            expect[f"train/acc_peer{k + 1}"] = row["train_acc"][k]
            if row["teacher_acc"] is not None:
                expect[f"test/teacher_acc_peer{k + 1}"] = row["teacher_acc"][k]
        if row["teacher_ensemble_acc"] is not None:
            expect["test/teacher_ensemble_acc"] = row["teacher_ensemble_acc"]
        for tag, value in expect.items():
            got = {ev.step: ev.value for ev in acc.Scalars(tag)}
            assert got[row["epoch"]] == pytest.approx(value, rel=1e-6), tag
    assert [ev.step for ev in acc.Scalars("test/teacher_ensemble_acc")] == [1, 3]
    assert not any(t.startswith("other/") for t in tags)           # every row key has its own tag
    # the per-step loss: mean of each block of N global steps, at the block's last step; the
    # blocks cut by an epoch's read-out (steps 4-6, 10-12) are whole, the last (13-15) too
    loss = {ev.step: ev.value for ev in acc.Scalars(tblog.STEP_LOSS_TAG)}
    assert sorted(loss) == [3, 6, 9, 12, 15]
    for end, value in loss.items():
        assert value == pytest.approx(step_loss[end - N:end].mean(), rel=1e-6)
    # the config as hparams
    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["arch"].string_value == "resnet20" and start.hparams["lr"].number_value == 0.1
    assert start.hparams["resolved.loader"].string_value == "resident" and start.hparams["nesterov"].string_value == "true"
    assert start.hparams["limit_train"].string_value == "None"


def test_loss_blocks_across_reads_and_a_partial_last_block(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tblog.TensorBoardLog(tmp_path, loss_every=4)
    log.steps(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    log.steps(np.array([4, 5]), np.array([5.0, 7.0]))
    log.steps(np.array([6]), np.array([float("nan")]))         # a non-finite step is left out
    log.close()                                                 # steps 5-6: written at close
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(ev.step, ev.value) for ev in acc.Scalars(tblog.STEP_LOSS_TAG)]
    assert got == [(4, pytest.approx(2.75)), (5, pytest.approx(7.0))]


def test_without_tensorboard_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    backends.reset_cache()
    try:
        with pytest.raises(CnmError, match=r"^tensorboard is not installed \(needed for --log tensorboard\): "
                                           r"pip install 'cnm\[tensorboard\]'$"):
            tblog.TensorBoardLog(tmp_path)
    finally:
        backends.reset_cache()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_buffer_record_inside_a_cuda_graph():
    """The step may run as one captured CUDA graph: record() must capture, and each replay adds
    one entry at the device counter."""
    buf = tblog.StepLossBuffer(8, "cuda")
    gstep = torch.zeros((), dtype=torch.int64, device="cuda")
    loss = torch.zeros((), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                        # warm-up outside the capture
        buf.record(loss, gstep)
    torch.cuda.current_stream().wait_stream(side)
    buf.read()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gstep += 1
        loss.add_(0.5)
        buf.record(loss, gstep)
    gstep.zero_()
    loss.zero_()
    buf.read()                                          # the capture itself recorded nothing real
    for _ in range(5):
        graph.replay()
    steps, vals, dropped = buf.read()
    assert steps.tolist() == [1, 2, 3, 4, 5] and vals.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5] and dropped == 0
