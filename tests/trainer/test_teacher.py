"""EMA self-ensemble teacher: the update formula by hand, no gradients, buffers, state, modes."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import CnmError
from trainer.models import MODELS
from trainer.models.resnet import CifarResNet
from trainer.peers import build_peers
from trainer.teacher import EMATeacher, ema_decay, peers_teacher, teacher_logits


@pytest.fixture(autouse=True)
def _tiny_resnet(monkeypatch):
    """A ResNet-8 (same class as resnet20/32/...) keeps these tests fast."""
    monkeypatch.setitem(MODELS, "tiny_resnet", lambda k, peers=1: CifarResNet(8, k, peers))


def _peers(peer_exec="loop", P=2):
    torch.manual_seed(0)
    return build_peers(["tiny_resnet"] * P, 10, peer_exec)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0),                       # 1 - 1/1: the first update copies the live weights
    (1, 0.5),                       # 1 - 1/2
    (10, 1.0 - 1.0 / 11.0),         # 0.90909...
    (10000, 0.999),                 # 1 - 1/10001 = 0.99990 > decay -> decay
])
def test_decay_schedule(step, expected):
    d = ema_decay(torch.tensor(step), 0.999)
    assert d.dtype == torch.float32 and d.dim() == 0
    assert d.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


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
    d = min(0.999, 1 - 1 / (step + 1))
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


def test_buffers_copied_by_default_and_averaged_on_request():
    live = _peers()
    live.train()
    live(torch.randn(2, 4, 3, 8, 8))                   # updates the live BN running stats
    copy_t = EMATeacher(_peers())
    copy_t.__dict__["_live"] = live
    copy_t.update(torch.tensor(5))
    for (name, e), b in zip(copy_t.module.named_buffers(), live.buffers()):
        assert torch.equal(e, b), name
    ema_t = EMATeacher(_peers(), buffers="ema")
    before = [b.clone() for b in ema_t.module.buffers()]
    ema_t.__dict__["_live"] = live
    ema_t.update(torch.tensor(5))                      # decay 1 - 1/6
    d = 5 / 6
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
    d = 1 - 1 / 11
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
