"""Loaders with an augment op yield finished (views, y_a, y_b, lam), equal to doing it by hand.

resident / ffcv / dali (non-native) apply the op on the device right after loading, with the
generator seeded from augment_seed(seed, epoch, rank, step): the output must equal the op applied
to the raw batch with that generator. The cpu baseline draws per-sample numpy generators in its
workers: its output must equal NumpyCutNMix.sample/.collate driven by the documented seeds, and
the reference op (`impl="reference"`) given the very parameters those generators drew.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.loaders import make_loader
from pipeline.loaders.base import augment_seed, sample_seed
from tests.pipeline.loaders.conftest import label_of, sample_ids

B = 16
SEED = 9


def cutnmix(**kw):
    ops = pytest.importorskip("pipeline.ops")
    return ops.CutNMix(**{"peers": 3, "out_dtype": torch.float32, "impl": "torch", **kw})


def check_contract(views, y_a, y_b, lam, batch, peers=3, dtype=torch.float32, device="cpu"):
    assert views.shape == (peers, batch, 3, 32, 32) and views.dtype == dtype
    assert all(views[k].is_contiguous(memory_format=torch.channels_last) for k in range(peers))
    assert y_a.dtype == y_b.dtype == torch.int64 and y_a.shape == y_b.shape == (batch,)
    assert lam.dtype == torch.float32 and lam.shape == (batch,)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert sorted(y_a.tolist()) == sorted(y_b.tolist())  # y_b = y_a[perm]
    for t in (views, y_a, y_b, lam):
        assert t.device.type == torch.device(device).type


def raw_batches(name, data, epoch, **kw):
    with make_loader(name, data, batch_size=B, seed=SEED, **kw) as loader:
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("spec", ["resident", "dali", "ffcv"])
def test_device_augment_equals_the_op_on_the_raw_batch(spec, prepared):
    if spec in ("dali", "ffcv"):
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[spec])
    aug = cutnmix()
    epoch, rank, world = 2, 1, 2
    kw = {"rank": rank, "world": world, "order": "shared"} if spec == "ffcv" else {"rank": rank, "world": world}
    raw = raw_batches("resident", prepared, epoch, rank=rank, world=world)  # the same shared order
    with make_loader(spec, prepared, batch_size=B, seed=SEED, augment=aug, **kw) as loader:
        loader.set_epoch(epoch)
        got = [tuple(t.clone() for t in out) for out in loader]
    assert len(got) == len(raw) == len(loader)
    for step, ((x, y), (views, y_a, y_b, lam)) in enumerate(zip(raw, got)):
        check_contract(views, y_a, y_b, lam, B)
        g = torch.Generator().manual_seed(augment_seed(SEED, epoch, rank, step))
        want = aug(x, y, generator=g)
        for a, b in zip((views, y_a, y_b, lam), want):
            assert torch.equal(a, b), step
        assert torch.equal(y_a, torch.from_numpy(label_of(sample_ids(x).numpy())))
    assert not torch.equal(got[0][3], got[1][3]) or not torch.equal(got[0][0], got[1][0])  # fresh draws per step


def _numpy_reference(naug, images, labels, epoch, rank, step):
    """What the cpu loader must yield for this raw batch: sample() per image, then collate()."""
    base = np.stack([naug.sample(images[i].numpy(), np.random.default_rng(sample_seed(SEED, epoch, rank, step, i)))
                     for i in range(len(images))])
    return naug.collate(base, labels.numpy(), np.random.default_rng(augment_seed(SEED, epoch, rank, step)))


def _params_drawn_by_the_cpu_loader(naug, batch, epoch, rank, step):
    """The CutNMixParams that the cpu loader's numpy generators drew for this batch.

    Replays NumpyCutNMix.sample's draws (offset_y [P], offset_x [P], flip [P]) per sample and
    NumpyCutNMix.draw_batch for the batch.
    """
    from pipeline.ops import CutNMixParams

    p = naug.peers
    oy, ox, fl = (np.zeros((p, batch), np.int64) for _ in range(3))
    for i in range(batch):
        rng = np.random.default_rng(sample_seed(SEED, epoch, rank, step, i))
        oy[:, i] = rng.integers(0, 2 * naug.pad + 1, size=p)
        ox[:, i] = rng.integers(0, 2 * naug.pad + 1, size=p)
        fl[:, i] = rng.integers(0, 2, size=p)
    d = naug.draw_batch(batch, 32, 32, np.random.default_rng(augment_seed(SEED, epoch, rank, step)))
    return CutNMixParams.from_numpy(dict(d, offset_y=oy, offset_x=ox, flip=fl, mode=naug.mode, pad=naug.pad))


@pytest.mark.parametrize("mode", ["cutnmix", "mixup"])
def test_cpu_baseline_equals_numpy_cutnmix_and_the_reference(mode, prepared):
    from pipeline.ops import cutnmix as cutnmix_fn
    from pipeline.ops.numpy_baseline import NumpyCutNMix

    aug = cutnmix(mode=mode)
    naug = NumpyCutNMix(aug)
    epoch, rank, world = 1, 0, 3
    raw = raw_batches("resident", prepared, epoch, rank=rank, world=world)
    runs = []
    for workers in (0, 2):  # the result may not depend on the worker count
        with make_loader("cpu", prepared, batch_size=B, seed=SEED, rank=rank, world=world, augment=aug,
                         num_workers=workers) as loader:
            loader.set_epoch(epoch)
            runs.append([tuple(t.clone() for t in out) for out in loader])
    assert len(runs[0]) == len(raw) == len(runs[1])
    for step, ((x, y), got, got2) in enumerate(zip(raw, *runs)):
        check_contract(*got, B)
        for a, b, c in zip(got, got2, _numpy_reference(naug, x, y, epoch, rank, step)):
            assert torch.equal(a, b) and torch.equal(a, c), step
        if step < 2:  # the per-pixel reference is slow: two batches
            params = _params_drawn_by_the_cpu_loader(naug, len(y), epoch, rank, step)
            want = cutnmix_fn(x, y, params, mean=aug.mean, std=aug.std, out_dtype=torch.float32, impl="reference")
            for a, b in zip(got, want):
                assert torch.equal(a, b), step


def test_cpu_baseline_out_dtype_and_raw_without_augment(prepared):
    aug = cutnmix(out_dtype=torch.bfloat16, peers=2)
    with make_loader("cpu", prepared, batch_size=B, augment=aug, num_workers=1) as loader:
        views, y_a, y_b, lam = next(iter(loader))
    check_contract(views, y_a, y_b, lam, B, peers=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["cutnmix", "cutmix", "mixup", "none"])
def test_dali_native_graph_equals_the_op_on_the_same_params(mode, prepared):
    """DALI's native graph, fed the params drawn from the (seed, epoch, rank, step) CPU generator,
    delivers exactly what the resident loader delivers on the CPU (float32, bit for bit)."""
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("pipeline.ops.dali_graph")
    aug = cutnmix(mode=mode)
    epoch = 1
    outs = {}
    for name, opts in (("resident", {}), ("dali", {"native_augment": True})):
        with make_loader(name, prepared, batch_size=B, seed=SEED, augment=aug, drop_last=False, **opts) as loader:
            loader.set_epoch(epoch)
            outs[name] = [tuple(t.clone() for t in out) for out in loader]
    assert len(outs["dali"]) == len(outs["resident"]) == -(-250 // B)
    for step, (want, got) in enumerate(zip(outs["resident"], outs["dali"])):
        check_contract(*got, len(got[1]))
        for a, b in zip(got, want):
            assert torch.equal(a, b), (mode, step)


@pytest.mark.parametrize("window", [{"mix_off_epoch": 1}, {"mix_on_epoch": 1, "mix_off_epoch": None}])
def test_cpu_baseline_mixes_only_in_its_mixing_epochs(prepared, window):
    """`mix_off_epoch=1` (what `cnm train --mix-off-epoch` passes): epoch 0 mixes; epoch 1 gives
    the base views of the same draws with mix_prob 0 (every lam 1), in the workers too;
    `mix_on_epoch=1` the other way round."""
    from pipeline.ops.numpy_baseline import NumpyCutNMix

    aug = cutnmix(mix_prob=0.9)
    clean = NumpyCutNMix(aug.with_mix_prob(0.0))
    for workers in (0, 1):
        with make_loader("cpu", prepared, batch_size=B, seed=SEED, augment=aug, num_workers=workers,
                         **window) as loader:
            got = {}
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                got[epoch] = [tuple(t.clone() for t in out) for out in loader]
        mixed, unmixed = (1, 0) if window.get("mix_on_epoch") else (0, 1)
        assert any((lam < 1).any() for *_, lam in got[mixed])
        raw = raw_batches("resident", prepared, unmixed)
        for step, ((x, y), out) in enumerate(zip(raw, got[unmixed])):
            assert (out[3] == 1).all()
            for a, b in zip(out, _numpy_reference(clean, x, y, unmixed, 0, step)):
                assert torch.equal(a, b), step
