"""EMA self-ensemble teacher: the warm-up and auto decay by hand, the update formula, no gradients,
BatchNorm statistics, state, modes, the once-only warning, no host sync."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import CnmError
from trainer.models import MODELS
from trainer.models.resnet import CifarResNet
from trainer.peers import build_peers
from trainer.teacher import (
    HORIZON_EPOCHS,
    EMATeacher,
    ema_decay,
    peers_teacher,
    resolve_decay,
    teacher_logits,
    teacher_warning,
)


@pytest.fixture(autouse=True)
def _tiny_resnet(monkeypatch):
    """A ResNet-8 (same class as resnet20/32/...) keeps these tests fast."""
    monkeypatch.setitem(MODELS, "tiny_resnet", lambda k, peers=1: CifarResNet(8, k, peers))


def _peers(peer_exec="loop", P=2):
    torch.manual_seed(0)
    return build_peers(["tiny_resnet"] * P, 10, peer_exec)


@pytest.mark.parametrize("step,expected", [
    (0, 0.1),                       # (1+0)/(10+0): the first update keeps 10% of the init
    (1, 2 / 11),                    # 0.1818...
    (10, 11 / 20),                  # 0.55
    (90, 0.91),                     # 91/100
    (990, 0.991),                   # 991/1000
    (10000, 0.999),                 # 10001/10010 = 0.99910 > decay -> decay
])
def test_decay_schedule(step, expected):
    d = ema_decay(torch.tensor(step), 0.999)
    assert d.dtype == torch.float32 and d.dim() == 0
    assert d.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_warm_up_forgets_the_initialisation():
    """The weight left on the initial copy after t updates is prod_{s<t} (1+s)/(10+s) =
    9! t! / (t+9)!: below 1e-5 after 20 steps (the old 1 - 1/(t+1) warm-up left 1/t on it: the
    uniform average of every iterate)."""
    w = 1.0
    for t in range(20):
        w *= ema_decay(torch.tensor(t), 0.999).item()
    assert w == pytest.approx(math.factorial(9) * math.factorial(20) / math.factorial(29), rel=1e-4)
    assert w < 1e-5


@pytest.mark.parametrize("steps,expected", [
    (391, 1 - 1 / (2.56 * 391)),    # CIFAR, batch 128: 0.99900 (the literature's 0.999)
    (49, 1 - 1 / 125.44),           # 8 GPUs x 128 on CIFAR: 0.99203
    (31, 1 - 1 / 79.36),            # 2000 images, batch 64: 0.98740
    (4, 1 - 1 / 10.24),             # 256 images, batch 64: 0.90234
    (1, 1 - 1 / 2.56),              # one step per epoch: 0.609375
])
def test_auto_decay_is_a_fixed_horizon_in_epochs(steps, expected):
    assert HORIZON_EPOCHS == 2.56
    assert resolve_decay("auto", steps) == pytest.approx(expected, rel=1e-12)
    assert 1 / (1 - resolve_decay("auto", steps)) == pytest.approx(HORIZON_EPOCHS * steps)
    assert resolve_decay("0.97", steps) == 0.97 and resolve_decay(0.5, steps) == 0.5


@pytest.mark.parametrize("value", ["1", "-0.1", "fast", 1.5])
def test_bad_decay_value(value):
    with pytest.raises(CnmError, match="--ema-decay must be auto or a number"):
        resolve_decay(value, 10)


@pytest.mark.parametrize("peer_exec", ["loop", "grouped"])
@pytest.mark.parametrize("step", [0, 1, 10, 10000])
def test_update_matches_hand_computation(peer_exec, step):
    live = _peers(peer_exec)
    teacher = EMATeacher(live, decay=0.999)
    with torch.no_grad():                          # move the live peers away from the copy
        for p in live.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.module.parameters()]
    teacher.update(torch.tensor(step))
    d = min(0.999, (1 + step) / (10 + step))
    for old, new, cur in zip(before, teacher.module.parameters(), live.parameters()):
        torch.testing.assert_close(new, d * old + (1 - d) * cur, rtol=1e-5, atol=1e-6)


def test_no_gradient_to_teacher_and_eval_mode():
    live = _peers()
    teacher = EMATeacher(live)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    teacher.train()
    assert not teacher.module.training                 # stays in eval mode
    views = torch.randn(2, 2, 3, 8, 8)
    logits = teacher(views)
    assert logits.shape == (2, 2, 10) and not logits.requires_grad
    z, _ = live(views)
    loss = (z - logits).square().mean()                # a teacher target in a student loss
    loss.backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert any(p.grad is not None for p in live.parameters())


def test_buffers_averaged_by_default_and_copied_on_request():
    live = _peers()
    live.train()
    live(torch.randn(2, 4, 3, 8, 8))                   # updates the live BN running stats
    copy_t = EMATeacher(_peers(), buffers="copy")
    copy_t.__dict__["_live"] = live
    copy_t.update(torch.tensor(5))
    for (name, e), b in zip(copy_t.module.named_buffers(), live.buffers()):
        assert torch.equal(e, b), name
    ema_t = EMATeacher(_peers())
    assert ema_t.buffer_mode == "ema"
    before = [b.clone() for b in ema_t.module.buffers()]
    ema_t.__dict__["_live"] = live
    ema_t.update(torch.tensor(5))                      # decay (1+5)/(10+5) = 0.4
    d = 6 / 15
    for old, new, cur in zip(before, ema_t.module.buffers(), live.buffers()):
        expected = d * old + (1 - d) * cur if old.is_floating_point() else cur
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-6)


def test_teacher_forward_equals_ema_peers_in_eval_mode():
    live = _peers("grouped")
    teacher = EMATeacher(live)
    views = torch.randn(2, 3, 3, 8, 8)
    live.eval()
    torch.testing.assert_close(teacher(views), live(views)[0])     # fresh copy == live weights
    torch.testing.assert_close(teacher.forward_shared(views[0]), live.forward_shared(views[0])[0])


def test_state_dict_round_trip_and_peer_form():
    live = _peers()
    teacher = EMATeacher(live)
    teacher.update(torch.tensor(3))
    other = EMATeacher(_peers())
    with torch.no_grad():
        for p in other.module.parameters():
            p.zero_()
    other.load_state_dict(teacher.state_dict())
    for a, b in zip(other.module.parameters(), teacher.module.parameters()):
        assert torch.equal(a, b)
    assert not any(k.startswith("_live") for k in teacher.state_dict())
    grouped = EMATeacher(_peers("grouped"))
    grouped.load_peer_state_dicts(teacher.peer_state_dicts())        # loop -> grouped teacher
    views = torch.randn(2, 2, 3, 8, 8)
    torch.testing.assert_close(grouped(views), teacher(views), rtol=1e-5, atol=1e-5)


def test_ensemble_helpers():
    z = torch.randn(3, 4, 10, requires_grad=True)
    t = teacher_logits(z)
    assert t.shape == (4, 10) and not t.requires_grad
    torch.testing.assert_close(t, z.detach().mean(0))
    torch.testing.assert_close(peers_teacher(z.bfloat16()), z.detach().bfloat16().float().mean(0))


def test_bad_decay_and_buffer_mode():
    with pytest.raises(CnmError):
        EMATeacher(_peers(), decay=1.0)
    teacher = EMATeacher(_peers())
    with pytest.raises(CnmError):
        teacher.decay = -0.5
    with pytest.raises(CnmError):
        EMATeacher(_peers(), buffers="average")


@pytest.mark.gpu
def test_update_is_cuda_graph_capturable(cuda_device):
    """The update reads the step from a device tensor: capture it once, replay with new steps."""
    live = _peers("grouped").to(cuda_device)
    teacher = EMATeacher(live)
    step = torch.zeros((), dtype=torch.int64, device=cuda_device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        teacher.update(step)                           # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        teacher.update(step)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.module.parameters()]
    step.fill_(10)
    graph.replay()
    d = 11 / 20
    for old, new, cur in zip(before, teacher.module.parameters(), live.parameters()):
        torch.testing.assert_close(new, d * old + (1 - d) * cur, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("buffers", ["copy", "ema"])
def test_update_makes_no_host_sync(buffers):
    """The EMA update is captured in the CUDA graph: not one host-syncing op (torch 2.13's
    `_foreach_lerp_` binds a 0-d tensor weight to `Scalar` and calls `.item()` inside aten)."""
    from tests.syncdetect import SyncDetector

    teacher = EMATeacher(_peers(), buffers=buffers)
    step = torch.tensor(3)
    with SyncDetector() as det:
        teacher.update(step)
    assert det.ops == []


def _rows(pairs, start=1):
    """metrics rows from (teacher ensemble, best peer) pairs; the other peer is 1 point worse."""
    return [{"epoch": start + i, "teacher_ensemble_acc": t, "test_acc": [p - 1, p]}
            for i, (t, p) in enumerate(pairs)]


def test_teacher_warning_fires_once_after_the_rampup():
    bad, good = (50.0, 60.0), (61.0, 60.0)
    pairs = [bad, bad, bad, good, bad, bad, bad, bad, bad, bad, bad]   # epochs 1..11
    fired = [e for e in range(1, len(pairs) + 1) if teacher_warning(_rows(pairs[:e]), rampup_epochs=3)]
    # epochs 1-3 are in the ramp-up, epoch 4 is good: the first 3-epoch streak ends at epoch 7
    assert fired == [7]
    msg = teacher_warning(_rows(pairs[:7]), rampup_epochs=3)
    assert "50.00%" in msg and "60.00%" in msg and "more than 2 points for 3 epochs" in msg
    assert teacher_warning(_rows(pairs[:7]), rampup_epochs=3, patience=4) is None
    assert teacher_warning(_rows(pairs[:8]), rampup_epochs=3, patience=4) is not None
    assert teacher_warning(_rows([(60.0, 60.0)] * 6), rampup_epochs=0) is None    # a tie is no fault
    assert teacher_warning(_rows([(58.0, 60.0)] * 3), rampup_epochs=0) is None    # within the margin
    assert teacher_warning(_rows([(57.5, 60.0)] * 3), rampup_epochs=0) is not None
    assert teacher_warning(_rows([(57.5, 60.0)] * 3), rampup_epochs=0, margin=3) is None
    no_teacher = [{"epoch": e, "teacher_ensemble_acc": None, "test_acc": [90.0]} for e in range(1, 9)]
    assert teacher_warning(no_teacher, rampup_epochs=0) is None
    assert teacher_warning([], rampup_epochs=0) is None


def test_ema_decay_setting_round_trips_through_config_files(tmp_path):
    """`ema_decay` is auto or a number: flags give strings, config files (and the config.json a
    run writes, which records the resolved number) give numbers; bad values are one line."""
    from trainer.config import load_config_file, make_config, parse_ema_decay

    assert make_config().ema_decay == "auto" and parse_ema_decay("auto") is None
    assert parse_ema_decay(make_config(overrides={"ema_decay": "0.97"}).ema_decay) == 0.97
    (tmp_path / "c.json").write_text('{"ema_decay": 0.9875}')
    cfg = make_config(load_config_file(tmp_path / "c.json"))
    assert resolve_decay(cfg.ema_decay, 31) == 0.9875
    (tmp_path / "c.toml").write_text('ema_decay = "auto"\n')
    assert make_config(load_config_file(tmp_path / "c.toml")).ema_decay == "auto"
    with pytest.raises(CnmError, match="--ema-decay must be auto or a number in"):
        make_config(overrides={"ema_decay": "1.0"})
    (tmp_path / "bad.toml").write_text("ema_decay = true\n")
    with pytest.raises(CnmError, match="--ema-decay must be a number or auto"):
        load_config_file(tmp_path / "bad.toml")


def test_teacher_bn_statistics_follow_the_teacher_weights():
    """With the default `buffers="ema"` the teacher's running mean/var are the same EMA of the
    live peers' running statistics as its weights are of theirs, step by step (hand-computed
    over several updates with the warm-up decays), and its step counter is the live one."""
    live = _peers()
    teacher = EMATeacher(live, decay=0.9)
    expected = [b.clone() for b in teacher.module.buffers()]
    gen = torch.Generator().manual_seed(1)
    for t in range(4):
        live.train()
        live(torch.randn(2, 4, 3, 8, 8, generator=gen) * (t + 1))      # moves the live BN statistics
        teacher.update(torch.tensor(t))
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * b if b.is_floating_point() else b.clone()
                    for e, b in zip(expected, live.buffers())]
    for (name, got), want, cur in zip(teacher.module.named_buffers(), expected, live.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if got.is_floating_point() and "running_var" in name:
            assert not torch.equal(got, cur), name        # not the live peers' statistics
