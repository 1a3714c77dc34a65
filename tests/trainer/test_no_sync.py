"""No host sync inside an epoch, in every configuration the trainer allows (issue 10, item 2).

Whole train steps run on the CPU under `tests.syncdetect.SyncDetector`, which records every
aten op that would make the host wait for a device value (also those run inside other ops,
like a 0-d tensor bound to a `Scalar`) and every `.cpu()/.numpy()/.tolist()`. Each axis of the
trainer's settings takes each of its values in at least one configuration below (peer-exec,
teacher, FML, mix mode, gradient hook, bf16, channels-last, mixed architectures, input form);
then steps recording the TensorBoard loss buffer, the augmentation draw and apply on their own,
and a resident-loader epoch. Tiny models and batches (resnet20/32, batch 4) keep the matrix fast.

The augmentation runs its torch implementation (`impl="torch"`): the op's CPU default, the
numba kernel, reads the host tensors through `.numpy()` (no sync on the CPU, where the data
already is, but the detector cannot tell), and the Triton kernel it uses on CUDA cannot run
here outside the interpreter; both are checked against the reference
(tests/pipeline/ops/test_equivalence.py).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.data.manifest import write_dataset
from pipeline.data.synthetic import class_names, make_synthetic
from pipeline.loaders import make_loader
from pipeline.ops.params import MODES
from tests.syncdetect import SyncDetector
from tests.trainer.test_step import K, _batch, _make
from trainer.distributed import GradAllReduce
from trainer.step import LossSetup, build_augment, step_seed
from trainer.tblog import StepLossBuffer

B = 4


class _FakeComm:
    """A two-process communicator without processes: the 'all-reduce' doubles in place."""

    world = 2

    def all_reduce_sum(self, t, *, block=True):   # Comm's signature (block: wait for the collective)
        return t.mul_(2.0)


def _hook(kind, step):
    if kind == "all-reduce":                     # as the loop installs it (pack/reduce/unpack)
        return GradAllReduce(step.optimizer.params, _FakeComm())
    if kind == "plain":                          # any callable on the gradients in place
        return lambda: torch._foreach_mul_([p.grad for p in step.optimizer.params], 0.5)
    return None


# (peer_exec, teacher, fml, mix, hook, bf16, channels_last, arch, host_augment)
CONFIGS = [
    ("loop", "ema", True, "cutnmix", None, False, False, "resnet20", False),
    ("grouped", "ema", True, "cutnmix", None, False, False, "resnet20", False),
    ("loop", "peers", True, "cutmix", None, False, False, "resnet20", False),
    ("grouped", "peers", False, "mixup", "all-reduce", False, True, "resnet20", False),
    ("loop", "none", False, "none", "plain", True, False, "resnet20", False),
    ("grouped", "none", True, "none", None, True, True, "resnet20", False),
    ("loop", "ema", False, "mixup", "all-reduce", True, True, "resnet20", False),
    ("grouped", "ema", True, "cutmix", "all-reduce", True, True, "resnet20", False),
    ("grouped", "peers", True, "cutnmix", "plain", False, True, "resnet20", False),
    ("loop", "ema", True, "cutnmix", "all-reduce", False, True, "resnet20,resnet32", False),
    ("loop", "peers", False, "cutmix", None, True, False, "resnet20,resnet32", False),
    ("loop", "none", True, "mixup", "plain", False, False, "resnet32,resnet20", False),
    ("loop", "ema", True, "cutnmix", "all-reduce", False, False, "resnet20", True),
    ("grouped", "peers", True, "none", None, True, True, "resnet20", True),
]


def _id(c):
    peer_exec, teacher, fml, mix, hook, bf16, cl, arch, host = c
    return "-".join([peer_exec, teacher, "fml" if fml else "nofml", mix, hook or "nohook",
                     "bf16" if bf16 else "fp32", "cl" if cl else "nchw", arch.replace(",", "+"),
                     "views" if host else "raw"])


def test_the_matrix_covers_every_setting():
    axes = list(zip(*CONFIGS))
    assert set(axes[0]) == {"loop", "grouped"} and set(axes[1]) == {"ema", "peers", "none"}
    assert set(axes[2]) == {True, False} and set(axes[3]) == set(MODES)
    assert set(axes[4]) == {None, "plain", "all-reduce"} and set(axes[5]) == set(axes[6]) == {True, False}
    assert any("," in a for a in axes[7]) and set(axes[8]) == {True, False}


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_train_steps_do_not_sync(config):
    peer_exec, teacher, fml, mix, hook, bf16, channels_last, arch, host_augment = config
    step = _make(peer_exec=peer_exec, teacher=teacher, fml=fml, mix=mix, bf16=bf16,
                 channels_last=channels_last, arch=arch, host_augment=host_augment, impl="torch")
    step.grad_hook = _hook(hook, step)
    batches = []
    for i in range(2):
        images, labels = _batch(i, b=B)
        if host_augment:   # what the CPU-augment loader yields for this (seed, epoch, step)
            g = torch.Generator().manual_seed(step_seed(0, 0, i))
            batches.append(step.augment(images, labels, generator=g))
        else:
            batches.append((images, labels))
    step.reset_metrics()
    with SyncDetector() as det:
        for i, batch in enumerate(batches):
            step.set_lr(0.1 / (i + 1))
            step.set_ramp(0.5 + 0.25 * i)
            step(*batch, epoch=0, step=i)
    assert det.ops == [], det.ops
    m = step.read_metrics()                    # the epoch's one host read, after the check
    assert m["steps"] == 2 and m["global_step"] == 2 and m["bad_step"] == -1
    assert all(0.0 <= a <= 100.0 for a in m["train_acc"]) and len(m["train_acc"]) == step.P == 2
    assert m["loss"] > 0 and m["ce"] > 0 and (m["kd"] > 0) == (teacher != "none") and (m["fml"] > 0) == fml


@pytest.mark.parametrize("mix", ["cutnmix", "mixup"])
def test_mix_target_teacher_steps_do_not_sync(mix):
    """--mix-target teacher weights the mixed samples' CE with the ramp tensor on the device."""
    step = _make(mix=mix, impl="torch")
    step.losses = LossSetup(mix_target="teacher")
    batches = [_batch(i, b=B) for i in range(2)]
    with SyncDetector() as det:
        for i, batch in enumerate(batches):
            step.set_ramp(0.5)
            step(*batch, epoch=0, step=i)
    assert det.ops == [], det.ops


def test_steps_across_the_mix_off_epoch_do_not_sync():
    """--mix-off-epoch: the step switches to the unmixed draws by the epoch number, on the host,
    without reading anything back (epoch 0 mixes, epoch 1 does not)."""
    step = _make(impl="torch", mix_prob=0.9, mix_off_epoch=1)
    with SyncDetector() as det:
        for epoch in (0, 1):
            step(*_batch(epoch, b=B), epoch=epoch, step=0)
    assert det.ops == [], det.ops
    assert (step.input_form.draw(B, 0, 0).lam < 1).any() and (step.input_form.draw(B, 1, 0).lam == 1).all()


def test_train_steps_with_the_tensorboard_loss_buffer_do_not_sync():
    """--log tensorboard: the step records its loss into a StepLossBuffer, still without a sync;
    the buffer then holds every step's total loss (their mean is the epoch's `loss`)."""
    step = _make(impl="torch")
    step.loss_buffer = StepLossBuffer(4, "cpu")
    step.set_global_step(5)
    step.reset_metrics()
    with SyncDetector() as det:
        for i in range(3):
            step(*_batch(i, b=B), epoch=0, step=i)
    assert det.ops == [], det.ops
    steps, losses, dropped = step.loss_buffer.read()
    m = step.read_metrics()
    assert steps.tolist() == [6, 7, 8] and dropped == 0 and m["global_step"] == 8
    assert float(losses.mean()) == pytest.approx(m["loss"], rel=1e-6)


@pytest.mark.parametrize("mix", MODES)
def test_augment_draw_and_apply_do_not_sync(mix):
    aug = build_augment(mix, 3, impl="torch")
    images, labels = _batch(0, b=B)
    g = torch.Generator()
    with SyncDetector() as det:
        g.manual_seed(step_seed(0, 1, 2))
        params = aug.draw(B, "cpu", g)
        views, _y_a, _y_b, lam = aug.apply(images, labels, params)
        aug(images, labels, generator=g)
    assert det.ops == [], det.ops
    assert views.shape == (3, B, 3, 32, 32) and lam.shape == (B,)


@pytest.mark.parametrize("augment", [False, True], ids=["raw", "augmented"])
def test_resident_loader_epoch_does_not_sync(tmp_path, augment):
    """The epoch's order is drawn on the host when the iteration starts (`iter(loader)`, by
    design once per epoch); every batch after that is synchronisation-free."""
    data = tmp_path / "data"
    write_dataset(data, make_synthetic(K, 20, 8, seed=0), dataset="synthetic", class_names=class_names(K),
                  beton=False)
    loader = make_loader("resident", data, batch_size=B, augment=build_augment("cutnmix", 2, impl="torch") if augment else None)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = iter(loader)
        with SyncDetector() as det:
            n = sum(1 for _ in batches)
        assert det.ops == [], det.ops
        assert n == len(loader) == 5
