"""Losses: against plain per-peer Python-loop references, limiting cases, gradient isolation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import CnmError
from trainer.losses import fml_loss, kd_loss, mixed_ce, rampup, shared_content

P, B, K = 3, 6, 5


def _batch():
    logits = torch.randn(P, B, K) * 3
    y_a = torch.randint(0, K, (B,))
    y_b = y_a[torch.randperm(B)]
    lam = torch.rand(B)
    lam[:2] = 1.0
    return logits, y_a, y_b, lam


def test_mixed_ce_matches_per_peer_loop_reference():
    logits, y_a, y_b, lam = _batch()
    ref = []
    for k in range(P):
        per_sample = [lam[i] * F.cross_entropy(logits[k, i:i + 1], y_a[i:i + 1])
                      + (1 - lam[i]) * F.cross_entropy(logits[k, i:i + 1], y_b[i:i + 1])
                      for i in range(B)]
        ref.append(torch.stack(per_sample).mean())
    out = mixed_ce(logits, y_a, y_b, lam)
    assert out.shape == (P,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-6, atol=1e-6)


def test_mixed_ce_lam_one_is_plain_ce_and_linear_in_lam():
    logits, y_a, y_b, _ = _batch()
    ones = torch.ones(B)
    plain = torch.stack([F.cross_entropy(logits[k], y_a) for k in range(P)])
    torch.testing.assert_close(mixed_ce(logits, y_a, y_b, ones), plain, rtol=1e-6, atol=1e-6)
    l0 = mixed_ce(logits, y_a, y_b, torch.zeros(B))
    for a in (0.25, 0.7):
        torch.testing.assert_close(mixed_ce(logits, y_a, y_b, torch.full((B,), a)),
                                   a * plain + (1 - a) * l0, rtol=1e-6, atol=1e-6)


def test_mixed_ce_weight_scales_each_sample_and_keeps_the_batch_mean():
    logits, y_a, y_b, lam = _batch()
    w = torch.linspace(0.0, 1.0, B)
    ref = torch.stack([torch.stack([w[i] * (lam[i] * F.cross_entropy(logits[k, i:i + 1], y_a[i:i + 1])
                                            + (1 - lam[i]) * F.cross_entropy(logits[k, i:i + 1], y_b[i:i + 1]))
                                    for i in range(B)]).sum() / B for k in range(P)])
    torch.testing.assert_close(mixed_ce(logits, y_a, y_b, lam, w), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed_ce(logits, y_a, y_b, lam, torch.ones(B)), mixed_ce(logits, y_a, y_b, lam))


def test_mixed_ce_bf16_logits_computed_in_fp32():
    logits, y_a, y_b, lam = _batch()
    low = logits.bfloat16()
    out = mixed_ce(low, y_a, y_b, lam)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mixed_ce(low.float(), y_a, y_b, lam), rtol=0, atol=0)


def _kd_reference(student, teacher, T):
    out = []
    for k in range(P):
        p = torch.softmax(teacher / T, -1)
        log_q = torch.log_softmax(student[k] / T, -1)
        kl = sum((p[i] * (p[i].log() - log_q[i])).sum() for i in range(B)) / B
        out.append(T * T * kl)
    return torch.stack(out)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_matches_reference_and_torch_kl_div(T):
    student, teacher = torch.randn(P, B, K) * 2, torch.randn(B, K) * 2
    out = kd_loss(student, teacher, T)
    torch.testing.assert_close(out, _kd_reference(student, teacher, T), rtol=1e-5, atol=1e-6)
    torch_kl = torch.stack([F.kl_div(torch.log_softmax(student[k] / T, -1),
                                     torch.softmax(teacher / T, -1), reduction="batchmean")
                            for k in range(P)]) * T * T
    torch.testing.assert_close(out, torch_kl, rtol=1e-5, atol=1e-6)
    assert (out > 0).all()


def test_kd_zero_when_teacher_equals_student():
    z = torch.randn(B, K)
    student = z.unsqueeze(0).repeat(P, 1, 1)
    torch.testing.assert_close(kd_loss(student, z, 3.0), torch.zeros(P), rtol=0, atol=1e-6)
    # a per-peer teacher [P, B, K] works too
    torch.testing.assert_close(kd_loss(student, student.clone(), 3.0), torch.zeros(P), rtol=0, atol=1e-6)


def test_kd_no_gradient_reaches_teacher():
    student = torch.randn(P, B, K, requires_grad=True)
    teacher = torch.randn(B, K, requires_grad=True)
    kd_loss(student, teacher, 3.0).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_bad_temperature():
    with pytest.raises(CnmError, match="temperature"):
        kd_loss(torch.randn(P, B, K), torch.randn(B, K), 0.0)


def _fml_reference(features):
    f = [x / x.norm(dim=1, keepdim=True) for x in features]
    out = []
    for k in range(len(f)):
        terms = [((f[k] - f[j].detach()) ** 2).sum(1).mean() for j in range(len(f)) if j != k]
        out.append(sum(terms) / len(terms))
    return torch.stack(out)


def test_fml_matches_reference():
    feats = [torch.randn(B, 8) for _ in range(P)]
    out = fml_loss(feats)
    assert out.shape == (P,) and out.dtype == torch.float32
    torch.testing.assert_close(out, _fml_reference(feats), rtol=1e-6, atol=1e-6)
    assert ((out >= 0) & (out <= 4)).all()


def test_fml_zero_for_equal_features_and_scale_invariant():
    f = torch.randn(B, 8)
    torch.testing.assert_close(fml_loss([f, f.clone(), 2.5 * f]), torch.zeros(P), rtol=0, atol=1e-6)


def test_fml_gradient_only_to_own_peer():
    feats = [torch.randn(B, 8, requires_grad=True) for _ in range(P)]
    out = fml_loss(feats)
    out[0].backward()                              # peer 0's loss: others are stop-gradient
    assert feats[0].grad.abs().sum() > 0
    for other in feats[1:]:                        # zero (or no) gradient to the targets
        assert other.grad is None or not other.grad.any()
    # the full gradient equals the reference's
    feats2 = [f.detach().clone().requires_grad_() for f in feats]
    ref_in = [f.detach().clone().requires_grad_() for f in feats]
    fml_loss(feats2).sum().backward()
    _fml_reference(ref_in).sum().backward()
    for a, b in zip(feats2, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_fml_single_peer_zero_and_unequal_dims_error():
    torch.testing.assert_close(fml_loss([torch.randn(B, 8)]), torch.zeros(1))
    with pytest.raises(CnmError, match="--no-fml"):
        fml_loss([torch.randn(B, 64), torch.randn(B, 512)])


@pytest.mark.parametrize("epoch,expected", [
    (0, math.exp(-5.0)),                  # 0.006738
    (40, math.exp(-5.0 * 0.25)),          # 0.286505
    (80, 1.0),
    (200, 1.0),
])
def test_rampup_values(epoch, expected):
    assert rampup(epoch, 80) == pytest.approx(expected, rel=1e-12)


def test_rampup_hand_values_and_edge_cases():
    assert rampup(0) == pytest.approx(0.006737947, rel=1e-6)
    assert rampup(40) == pytest.approx(0.286504797, rel=1e-6)
    assert rampup(12.5, 0) == 1.0
    assert rampup(20, 80) < rampup(60, 80) < 1.0
    with pytest.raises(CnmError):
        rampup(1, -1)


def test_losses_under_bf16_autocast_stay_fp32():
    logits = torch.randn(P, B, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.bfloat16()
        y = torch.randint(0, K, (B,))
        outs = [mixed_ce(low, y, y, torch.ones(B)), kd_loss(low, low[0], 3.0),
                fml_loss(list(low))]
    assert all(o.dtype == torch.float32 for o in outs)


def test_weighted_kd_and_fml_are_the_means_over_the_counted_samples():
    torch.manual_seed(3)
    P, B, K, F = 3, 7, 5, 6
    student, teacher = torch.randn(P, B, K), torch.randn(P, B, K)
    feats = [torch.randn(B, F) for _ in range(P)]
    w = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    idx = w.nonzero().squeeze(1)
    torch.testing.assert_close(kd_loss(student, teacher, 3.0, w), kd_loss(student[:, idx], teacher[:, idx], 3.0))
    torch.testing.assert_close(fml_loss(feats, w), fml_loss([f[idx] for f in feats]))
    none = torch.zeros(B, dtype=torch.bool)          # no sample counts: 0, not NaN
    assert torch.equal(kd_loss(student, teacher, 3.0, none), torch.zeros(P))
    assert torch.equal(fml_loss(feats, none), torch.zeros(P))
    ones = torch.ones(B, dtype=torch.bool)
    torch.testing.assert_close(fml_loss(feats, ones), fml_loss(feats))


def test_shared_content_only_separates_cutnmix_mixed_samples():
    lam = torch.tensor([1.0, 0.75, 1.0, 0.25])
    assert shared_content(lam, "cutnmix").tolist() == [True, False, True, False]
    for mode in ("cutmix", "mixup", "none"):
        assert shared_content(lam, mode).tolist() == [True] * 4
