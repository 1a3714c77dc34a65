"""The train step: optimiser reference, memory formats, peer execution, NaN flag, input forms,
and (gpu) CUDA graph == eager, bf16 close to fp32. Host syncs: test_no_sync.py."""

from __future__ import annotations

import pytest
import torch

from trainer.optim import CapturableSGD
from trainer.step import LossSetup, TrainStep, build_augment, step_seed

ARCH = "resnet20"
K = 10
B = 8


def _batch(seed=0, device="cpu", b=B):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, K, (b,), generator=g)
    return images.to(device), labels.to(device)


def _make(peer_exec="loop", channels_last=False, teacher="ema", fml=True, peers=2, device="cpu",
          bf16=False, cuda_graphs=False, mix="cutnmix", seed=0, lr=0.01, arch=ARCH, host_augment=False,
          impl="auto", mix_prob=0.5, mix_off_epoch=None, mix_on_epoch=0):
    from trainer.peers import build_peers
    from trainer.teacher import EMATeacher

    torch.manual_seed(seed)
    archs = arch.split(",") if "," in arch else [arch] * peers
    ps = build_peers(archs, K, peer_exec=peer_exec).to(device)
    if channels_last:
        ps = ps.to(memory_format=torch.channels_last)
    ema = EMATeacher(ps, decay=0.999) if teacher == "ema" else None
    aug = build_augment(mix, len(archs), out_dtype=torch.bfloat16 if bf16 else torch.float32, impl=impl,
                        mix_prob=mix_prob)
    step = TrainStep(ps, ema, aug, losses=LossSetup(teacher=teacher, fml=fml), lr=lr, device=device,
                     bf16=bf16, channels_last=channels_last, cuda_graphs=cuda_graphs, seed=seed,
                     host_augment=host_augment, mix_off_epoch=mix_off_epoch, mix_on_epoch=mix_on_epoch)
    step.set_ramp(1.0)
    return step


def _run(step, n, device="cpu"):
    for i in range(n):
        images, labels = _batch(i, device)
        step(images, labels, epoch=0, step=i)


def _peer_params(step):
    return step.peerset.peer_state_dicts()


def _assert_peers_close(a, b, atol):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k].float().cpu(), sb[k].float().cpu(), atol=atol, rtol=0, msg=k)


def test_capturable_sgd_equals_torch_sgd():
    torch.manual_seed(1)
    ref = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    opt_ref = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    lr = torch.tensor(0.1)
    opt = CapturableSGD(mine, lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for it in range(4):
        grads = [torch.randn_like(p) for p in ref]
        if it == 2:  # lr change through the tensor, as the schedule does
            lr.fill_(0.01)
            for group in opt_ref.param_groups:
                group["lr"] = 0.01
        for p, q, g in zip(ref, mine, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
        for p, q in zip(ref, mine):
            torch.testing.assert_close(q, p, atol=1e-7, rtol=1e-6)


def test_step_seed_is_the_loaders_augment_seed():
    from pipeline.loaders.base import augment_seed

    assert step_seed(3, 4, 5, 1) == augment_seed(3, 4, 1, 5)
    assert step_seed(0, 0, 0) != step_seed(0, 0, 1) != step_seed(0, 1, 0)


def test_channels_last_equals_contiguous_fp32():
    """Same views, same init: the channels-last step computes the same forward and losses.

    Only the forward is compared on the CPU: torch's CPU channels-last BatchNorm backward in
    fp32 loses precision for channels whose |mean| >> std (reproduced with a bare
    nn.BatchNorm2d, input mean 5, std 0.1: input-gradient error 46 against float64, vs 5e-6 for
    the contiguous kernel), so CPU parameters drift apart after a step for reasons outside cnm.
    That is why `--channels-last auto` is off on the CPU; the CUDA test below compares the
    parameters after several steps.
    """
    a, b = _make(channels_last=False), _make(channels_last=True)
    x, y = _batch(0)
    params = a.input_form.draw(B, 0, 0)
    va = a.augment.apply(x, y, params)[0]
    vb = b.augment.apply(x, y, params)[0]
    assert vb[1].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        la, fa = a.peerset(va.contiguous())
        lb, fb = b.peerset(vb)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for u, v in zip(fa, fb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
    a(x, y, epoch=0, step=0)
    b(x, y, epoch=0, step=0)
    ma, mb = a.read_metrics(), b.read_metrics()
    for term in ("loss", "ce", "kd", "fml"):
        assert abs(ma[term] - mb[term]) <= 1e-5 * max(1.0, abs(ma[term])), term
    assert ma["train_acc"] == mb["train_acc"]


def test_loop_equals_grouped_after_two_steps():
    """fp32, CPU. lr 0.01: with batch 8, BatchNorm's backward amplifies the summation-order
    differences between grouped and separate convolutions (1e-7 after the first step) roughly
    a thousandfold in the second step's gradient; at lr 0.05 the parameters differ by ~1e-4."""
    a, b = _make(peer_exec="loop"), _make(peer_exec="grouped")
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=0)  # same initial peers
    _run(a, 2)
    _run(b, 2)
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=2e-5)
    _assert_peers_close(a.teacher.module.peer_state_dicts(), b.teacher.module.peer_state_dicts(), atol=2e-5)


def test_grouped_peers_get_the_grouped_layout_from_the_op():
    """Grouped peers: the op writes [B,P*3,H,W] itself (no views_to_grouped_input copy), and the
    step equals the same step fed the [P,B,3,H,W] views (the loader path, which is converted)."""
    a, b = _make(peer_exec="grouped"), _make(peer_exec="grouped", host_augment=True)
    assert a.input_form.augment.layout == "grouped" and a.augment.layout == "peers"
    images, labels = _batch(0)
    g = torch.Generator().manual_seed(step_seed(0, 3, 0))
    grouped = a.input_form.views(*a.input_form.inputs((images, labels), 3, 0))[0]
    assert grouped.shape == (B, 2 * 3, 32, 32)
    a(images, labels, epoch=3, step=0)
    b(*b.augment(images, labels, generator=g), epoch=3, step=0)
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=0)


def test_views_path_equals_raw_path():
    """A loader that augments with the same (seed, epoch, step) generator gives the same step."""
    a, b = _make(), _make(host_augment=True)
    for i in range(2):
        images, labels = _batch(i)
        a(images, labels, epoch=3, step=i)
        g = torch.Generator().manual_seed(step_seed(0, 3, i))
        b(*b.augment(images, labels, generator=g), epoch=3, step=i)
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=0)


def test_mixing_stops_at_mix_off_epoch():
    """From `mix_off_epoch` on, the step draws the same parameters with mix_prob 0: the same
    crops and flips, no mixed sample, and the step equals one of an op that never mixes."""
    step = _make(mix_prob=0.9, mix_off_epoch=2)
    before, after = step.input_form.draw(B, 1, 0), step.input_form.draw(B, 2, 0)
    assert (before.lam < 1).any() and (after.lam == 1).all() and not after.mixed.any()
    clean = _make(mix_prob=0.0).input_form.draw(B, 2, 0)
    for name in ("offset_y", "offset_x", "flip", "perm", "lam", "mixed"):
        assert torch.equal(getattr(after, name), getattr(clean, name)), name
    a, b = _make(mix_prob=0.9, mix_off_epoch=2), _make(mix_prob=0.0)
    for i in range(2):
        images, labels = _batch(i)
        a(images, labels, epoch=2, step=i)
        b(images, labels, epoch=2, step=i)
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=0)


def test_mixing_starts_at_mix_on_epoch():
    """Before `mix_on_epoch` the step draws the same parameters with mix_prob 0 (as after
    `mix_off_epoch`); from it to `mix_off_epoch` it mixes."""
    step = _make(mix_prob=0.9, mix_on_epoch=2, mix_off_epoch=4)
    draws = {e: step.input_form.draw(B, e, 0) for e in (1, 2, 3, 4)}
    assert [bool((draws[e].lam < 1).any()) for e in (1, 2, 3, 4)] == [False, True, True, False]
    clean = _make(mix_prob=0.0).input_form.draw(B, 1, 0)
    for name in ("offset_y", "offset_x", "flip", "perm", "lam", "mixed"):
        assert torch.equal(getattr(draws[1], name), getattr(clean, name)), name


def test_metrics_terms_switch_off():
    step = _make(teacher="none", fml=False)
    _run(step, 2)
    m = step.read_metrics()
    assert m["kd"] == 0.0 and m["fml"] == 0.0
    assert abs(m["loss"] - 2 * m["ce"]) < 1e-5  # loss sums the 2 peers' CE, ce is their mean
    assert step.teacher is None


@pytest.mark.parametrize("align", [True, False])
def test_aligned_views_kd_targets_and_fml(align):
    """--align-views: on a Cut^nMix sample whose peers see different content (lam < 1), peer k's KD
    target is its own EMA teacher on its own view and FML skips the sample; on shared samples
    the target is the teachers' mean. Checked against the loss computed by hand on the views."""
    from trainer import losses as L

    step = _make(host_augment=True)
    step.losses = LossSetup(align_views=align)
    images, labels = _batch(0)
    views, y_a, y_b, lam = step.augment(images, labels, generator=torch.Generator().manual_seed(1))
    lam = torch.where(torch.arange(B) % 2 == 0, torch.ones(B), torch.full((B,), 0.5))  # half mixed
    with torch.no_grad():
        logits, feats = step.peerset(views)
        t = step.teacher(views).float()
    shared = lam == 1
    target = torch.where(shared.view(1, -1, 1), t.mean(0, keepdim=True), t) if align else t.mean(0)
    kd = L.kd_loss(logits, target, 3.0)
    fml = L.fml_loss(list(feats), shared if align else None)
    step.reset_metrics()
    step(views, y_a, y_b, lam, epoch=0, step=0)
    m = step.read_metrics()
    assert m["kd"] == pytest.approx(kd.mean().item(), rel=1e-5)
    assert m["fml"] == pytest.approx(fml.mean().item(), rel=1e-5)
    if align:  # the cross-view terms really changed: the unaligned values differ
        assert abs(m["fml"] - L.fml_loss(list(feats)).mean().item()) > 1e-4
        assert abs(m["kd"] - L.kd_loss(logits, t.mean(0), 3.0).mean().item()) > 1e-4


@pytest.mark.parametrize("target", ["area", "teacher"])
def test_mix_target_teacher_fades_the_mixed_samples_area_ce(target):
    """--mix-target teacher: a mixed sample's area cross-entropy is weighted by 1 - w(e), an
    unmixed sample's by 1; area (the default) weights every sample by 1. Checked by hand."""
    from trainer import losses as L

    step = _make(host_augment=True)
    step.losses = LossSetup(mix_target=target)
    step.set_ramp(0.25)
    images, labels = _batch(0)
    views, y_a, y_b, lam = step.augment(images, labels, generator=torch.Generator().manual_seed(1))
    lam = torch.where(torch.arange(B) % 2 == 0, torch.ones(B), torch.full((B,), 0.5))  # half mixed
    with torch.no_grad():
        logits, _ = step.peerset(views)
    logp = torch.log_softmax(logits, -1)
    per_sample = -(lam * logp[:, torch.arange(B), y_a] + (1 - lam) * logp[:, torch.arange(B), y_b])
    weight = torch.where(lam < 1, 0.75, 1.0) if target == "teacher" else torch.ones(B)
    step.reset_metrics()
    step(views, y_a, y_b, lam, epoch=0, step=0)
    ce = step.read_metrics()["ce"]
    assert ce == pytest.approx((per_sample * weight).mean().item(), rel=1e-5)
    if target == "teacher":
        assert abs(ce - L.mixed_ce(logits, y_a, y_b, lam).mean().item()) > 1e-3


def test_non_finite_loss_is_flagged_with_its_step():
    step = _make()
    step.reset_metrics()
    _run(step, 1)
    step.set_ramp(float("nan"))
    x, y = _batch(5)
    step(x, y, epoch=0, step=1)
    step(x, y, epoch=0, step=2)
    m = step.read_metrics()
    assert m["bad_step"] == 1


def test_grad_hook_runs_between_backward_and_update():
    """The data-parallel seam: the hook sees this step's gradients before the optimiser uses them."""
    step = _make(teacher="none")
    p = step.optimizer.params[0]
    seen = []

    def hook():
        seen.append((p.grad is not None, torch.equal(p, before)))
        for q in step.optimizer.params:
            q.grad.zero_()                       # no gradient: only weight decay moves the weights

    step.grad_hook = hook
    before = p.detach().clone()
    x, y = _batch(0)
    step(x, y, epoch=0, step=0)
    assert seen == [(True, True)]
    torch.testing.assert_close(p.detach(), before * (1 - 0.01 * 5e-4 * (1 + 0.9)), rtol=1e-6, atol=1e-8)


def test_bench_factory_runs_on_cpu():
    from bench.train_step import build_bench_step

    b = build_bench_step("resnet20", 2, "grouped", "cpu", bf16=False, channels_last=True, cuda_graphs=False,
                         batch_size=4, num_classes=10)
    b.run(1)
    b(b.images, b.labels)
    b.sync()
    assert b.step.read_metrics()["steps"] == 2 and b.images_per_step == 4
    b.close()


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("peer_exec", ["loop", "grouped"])
def test_cuda_graph_step_equals_eager(cuda_device, peer_exec, cuda_fp32_exact):
    torch.backends.cudnn.deterministic = True
    eager = _make(peer_exec=peer_exec, channels_last=True, device="cuda")
    graph = _make(peer_exec=peer_exec, channels_last=True, device="cuda", cuda_graphs=True)
    for i in range(5):
        x, y = _batch(i, "cuda")
        if i == 3:
            for s in (eager, graph):
                s.set_lr(0.01)
                s.set_ramp(0.5)
        eager(x, y, epoch=1, step=i)
        graph(x, y, epoch=1, step=i)
    assert graph._graph is not None
    torch.cuda.synchronize()
    _assert_peers_close(_peer_params(eager), _peer_params(graph), atol=1e-4)
    _assert_peers_close(eager.teacher.module.peer_state_dicts(), graph.teacher.module.peer_state_dicts(), atol=1e-4)
    me, mg = eager.read_metrics(), graph.read_metrics()
    assert me["steps"] == mg["steps"] == 5 and me["global_step"] == mg["global_step"] == 5
    assert abs(me["loss"] - mg["loss"]) < 1e-3 * abs(me["loss"])


@pytest.mark.gpu
def test_cuda_graph_with_grad_hook_equals_eager(cuda_device, cuda_fp32_exact):
    """With a gradient hook the step is two graphs with the hook between them."""
    torch.backends.cudnn.deterministic = True

    def halve(step):
        def hook():
            torch._foreach_mul_([q.grad for q in step.optimizer.params], 0.5)
        return hook

    eager = _make(peer_exec="grouped", channels_last=True, device="cuda")
    graph = _make(peer_exec="grouped", channels_last=True, device="cuda", cuda_graphs=True)
    eager.grad_hook, graph.grad_hook = halve(eager), halve(graph)
    for i in range(4):
        x, y = _batch(i, "cuda")
        eager(x, y, epoch=0, step=i)
        graph(x, y, epoch=0, step=i)
    assert len(graph._graphs) == 2
    torch.cuda.synchronize()
    _assert_peers_close(_peer_params(eager), _peer_params(graph), atol=1e-4)


@pytest.mark.gpu
def test_cuda_steps_do_not_sync(cuda_device):
    for graphs in (False, True):
        step = _make(peer_exec="grouped", channels_last=True, device="cuda", bf16=True, cuda_graphs=graphs)
        batches = [_batch(i, "cuda") for i in range(4)]
        step(*batches[0], epoch=0, step=0)  # capture (allowed to sync) outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i, (x, y) in enumerate(batches[1:], start=1):
                step.set_lr(0.1 / i)
                step(x, y, epoch=0, step=i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert step.read_metrics()["steps"] == 4


@pytest.mark.gpu
def test_bf16_step_close_to_fp32(cuda_device, cuda_fp32_exact):
    """Stated tolerance: after 3 steps (lr 0.01, batch 8) the mean loss agrees within 2% and every peer
    parameter tensor within 2% relative L2 distance of the fp32 step."""
    f32 = _make(channels_last=True, device="cuda")
    b16 = _make(channels_last=True, device="cuda", bf16=True)
    _run(f32, 3, "cuda")
    _run(b16, 3, "cuda")
    mf, mb = f32.read_metrics(), b16.read_metrics()
    assert abs(mf["loss"] - mb["loss"]) <= 0.02 * mf["loss"]
    for sa, sb in zip(_peer_params(f32), _peer_params(b16)):
        for k in sa:
            if sa[k].is_floating_point() and sa[k].numel() > 1:
                rel = (sa[k] - sb[k]).float().norm() / sa[k].float().norm().clamp_min(1e-12)
                assert rel < 0.02, (k, float(rel))


@pytest.mark.gpu
def test_cuda_channels_last_equals_contiguous(cuda_device, cuda_fp32_exact):
    torch.backends.cudnn.deterministic = True
    a = _make(channels_last=False, device="cuda")
    b = _make(channels_last=True, device="cuda")
    _run(a, 3, "cuda")
    _run(b, 3, "cuda")
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=1e-4)


@pytest.mark.gpu
def test_cuda_grouped_equals_loop(cuda_device, cuda_fp32_exact):
    torch.backends.cudnn.deterministic = True
    a = _make(peer_exec="loop", channels_last=True, device="cuda")
    b = _make(peer_exec="grouped", channels_last=True, device="cuda")
    _run(a, 2, "cuda")
    _run(b, 2, "cuda")
    _assert_peers_close(_peer_params(a), _peer_params(b), atol=1e-4)
