"""Evaluation: accuracies from known logits (peers, mean-softmax ensemble, teacher), sharded
counts, and `cnm eval` on a checkpoint (table, eval.json, bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cnm.cli import main
from pipeline.data.manifest import write_dataset
from pipeline.errors import CnmError
from trainer import checkpoint as ckpt
from trainer.evaluate import Evaluator, evaluate_checkpoint, normalise
from trainer.peers import build_peers

K = 4


class FixedLogits(nn.Module):
    """A fake PeerSet: logits decided by the sample's first pixel (its index), not by the net."""

    def __init__(self, table: torch.Tensor):  # table [P, N, K]
        super().__init__()
        self.peers = table.shape[0]
        self.table = table
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, views):  # views [P,B,3,H,W] normalised with mean 0, std 1
        idx = views[0, :, 0, 0, 0].round().long()
        return self.table[:, idx], [views[k].flatten(1)[:, :2] for k in range(self.peers)]


def _images(n):
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def test_accuracies_from_known_logits():
    n = 6
    labels = np.array([0, 1, 2, 3, 0, 1])
    table = torch.full((2, n, K), 0.0)
    # peer 0 (logit 2 on its pick) is right on samples 0..3, peer 1 (logit 1) on 2..5; on
    # sample 0 peer 1 is very sure (logit 8) of a wrong class
    for i in range(n):
        table[0, i, labels[i] if i < 4 else (labels[i] + 1) % K] = 2.0
        table[1, i, labels[i] if i >= 2 else (labels[i] + 2) % K] = 1.0
    table[1, 0, 2] = 8.0
    ev = Evaluator(_images(n), labels, mean=(0, 0, 0), std=(1, 1, 1), batch_size=4)
    acc = ev(FixedLogits(table), FixedLogits(table.flip(0)))
    assert acc["test_acc"] == pytest.approx([100 * 4 / 6, 100 * 4 / 6])
    # mean softmax: 0 wrong (peer 1's 8 wins), 1 right (peer 0's 2 beats peer 1's 1), 2, 3 right,
    # 4 and 5 wrong (peer 0's 2 wins)
    assert acc["ensemble_acc"] == pytest.approx(50.0)
    assert acc["teacher_acc"] == pytest.approx(acc["test_acc"][::-1])
    assert acc["teacher_ensemble_acc"] == pytest.approx(50.0)
    # the peers' picks differ on samples 0 (0 vs 2), 1 (1 vs 3), 4 (1 vs 0) and 5 (2 vs 1)
    assert acc["disagreement"] == pytest.approx(100 * 4 / 6)
    assert acc["test_images"] == n


def test_disagreement_is_the_mean_over_peer_pairs():
    """3 peers, random logits, batches that split the split: the mean over the 3 pairs of the %
    of images the two predict differently; None for one peer (nothing to disagree with)."""
    n = 9
    labels = np.arange(n) % K
    table = torch.randn(3, n, K, generator=torch.Generator().manual_seed(1))
    ev = Evaluator(_images(n), labels, mean=(0, 0, 0), std=(1, 1, 1), batch_size=4)
    pred = table.argmax(-1).tolist()
    pairs = [(a, b) for a in range(3) for b in range(a + 1, 3)]
    expect = sum(100 * sum(pred[a][i] != pred[b][i] for i in range(n)) / n for a, b in pairs) / len(pairs)
    assert 0 < expect < 100
    assert ev(FixedLogits(table))["disagreement"] == pytest.approx(expect)
    assert ev(FixedLogits(table[:1]))["disagreement"] is None


def test_sharded_counts_add_up_to_the_whole_split():
    n = 7
    labels = np.arange(n) % K
    table = torch.randn(3, n, K)
    full = Evaluator(_images(n), labels, mean=(0, 0, 0), std=(1, 1, 1))(FixedLogits(table))
    shards = []

    def capture(t):
        shards.append(t.clone())
        return t

    for rank in range(2):
        Evaluator(_images(n), labels, mean=(0, 0, 0), std=(1, 1, 1), rank=rank, world=2,
                  reduce=capture)(FixedLogits(table))
    total = shards[0] + shards[1]
    assert float(total[-1]) == n
    assert 100 * total[:3] / n == pytest.approx(torch.tensor(full["test_acc"], dtype=torch.float64))


def test_normalise_matches_the_augment_op():
    """Test images are normalised exactly like training views (Cut^nMix mode none, no crop/flip)."""
    from pipeline.ops import CutNMix

    x = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    mean, std = (120.0, 115.5, 100.25), (60.0, 61.0, 70.0)
    op = CutNMix(peers=1, mode="none", pad=0, flip=False, mean=mean, std=std, out_dtype=torch.float32)
    views, *_ = op(x, torch.zeros(5, dtype=torch.int64), generator=torch.Generator().manual_seed(0))
    inv = torch.tensor((1.0 / np.asarray(std, np.float64)).astype(np.float32))
    ours = normalise(x, torch.tensor(np.float32(mean)), inv, channels_last=True)
    torch.testing.assert_close(ours, views[0], atol=0, rtol=0)


@pytest.fixture
def checkpoint_run(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    imgs = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_dataset(data, {"train": (imgs, np.arange(40) % K), "test": (imgs[:24], np.arange(24) % K)},
                  dataset="fake", class_names=[str(i) for i in range(K)], beton=False)
    torch.manual_seed(0)
    peers = build_peers(["resnet20"] * 2, K)
    teacher = build_peers(["resnet20"] * 2, K)
    run = tmp_path / "run"
    run.mkdir()
    ckpt.save_checkpoint(run / "last.pt", {
        "format": ckpt.CHECKPOINT_FORMAT, "config": {"data": str(data)}, "epoch": 3, "archs": ["resnet20"] * 2,
        "num_classes": K, "peers": peers.peer_state_dicts(), "teacher": teacher.peer_state_dicts()})
    return run, data, peers, teacher


def test_evaluate_checkpoint_matches_the_evaluator_and_writes_eval_json(checkpoint_run):
    from pipeline.data.manifest import load_manifest

    run, data, peers, teacher = checkpoint_run
    result = evaluate_checkpoint(run, device="cpu")
    direct = Evaluator.from_manifest(load_manifest(data))(peers, teacher)
    for key in ("test_acc", "ensemble_acc", "teacher_acc", "teacher_ensemble_acc", "disagreement"):
        assert result[key] == pytest.approx(direct[key])
    saved = json.loads((run / "eval-last.json").read_text())       # of last.pt (the run's only one)
    assert saved["epoch"] == 3 and saved["test_images"] == 24 and saved["test_acc"] == result["test_acc"]


def test_cnm_eval_cli(checkpoint_run, capsys, tmp_path):
    run, data, *_ = checkpoint_run
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run / "last.pt"), "--data", str(data), "--device", "cpu", "--quiet"])
    assert e.value.code == 0
    out = capsys.readouterr()
    assert "ensemble" in out.out and "teacher-ensemble" in out.out and "eval-last.json" in out.err
    saved = json.loads((run / "eval-last.json").read_text())
    assert f"disagreement {saved['disagreement']:.2f}" in out.out
    with pytest.raises(SystemExit):                                   # the table says it in its caption
        main(["eval", str(run / "last.pt"), "--data", str(data), "--device", "cpu"])
    assert f"two peers disagree on {saved['disagreement']:.2f}% of the test images" in capsys.readouterr().out
    # bad input: one line, exit 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    other = tmp_path / "other"
    write_dataset(other, {"train": (np.arange(4 * 32 * 32 * 3, dtype=np.uint8).reshape(4, 32, 32, 3),
                                     np.arange(4) % 3)},
                  dataset="fake", class_names=["a", "b", "c"], beton=False)
    for argv, msg in [([str(tmp_path / "missing")], "no such run directory"),
                      ([str(bad)], "not a complete checkpoint file"),
                      ([str(tmp_path)], "no best.pt or last.pt"),
                      ([str(run), "--data", str(tmp_path / "nodata")], "cnm prepare --dataset cifar100"),
                      ([str(run), "--data", str(other)], "3 classes")]:
        with pytest.raises(SystemExit) as e:
            main(["eval", *argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and msg in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(CnmError, match="--batch-size"):
        evaluate_checkpoint(run, batch_size=0)
