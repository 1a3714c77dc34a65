"""The public API of pipeline.ops: CutNMix, reproducibility, layouts, errors, impl choice, and
the per-sample numpy baseline used by the cpu loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import CnmError
from pipeline.ops import CutNMix, CutNMixParams, cutnmix, draw_params, numba_impl, resolve_impl
from pipeline.ops.numpy_baseline import NumpyCutNMix, base_views_np, mix_normalise_np, numpy_cutnmix
from tests.pipeline.ops._util import MEAN, STD, images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["cutnmix", "cutmix", "mixup", "none"])
def test_outputs_device_dtype_layout(mode, dtype):
    aug = CutNMix(peers=3, mode=mode, out_dtype=dtype)
    imgs, labels = images(9, 32, 32), torch.arange(9) % 4
    views, y_a, y_b, lam = aug(imgs, labels, generator=torch.Generator().manual_seed(0))
    assert views.shape == (3, 9, 3, 32, 32) and views.dtype == dtype and views.device == imgs.device
    for k in range(3):
        assert views[k].is_contiguous(memory_format=torch.channels_last)
    assert y_a.dtype == torch.int64 and torch.equal(y_a, labels)
    assert lam.dtype == torch.float32 and lam.shape == (9,)
    params = aug.draw(9, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(y_b, labels[params.perm]) and torch.equal(lam, params.lam)


def test_same_seed_same_views_different_seed_different_views():
    aug = CutNMix(peers=3)
    imgs, labels = images(32, 32, 32), torch.arange(32)
    a = aug(imgs, labels, generator=torch.Generator().manual_seed(42))
    b = aug(imgs, labels, generator=torch.Generator().manual_seed(42))
    c = aug(imgs, labels, generator=torch.Generator().manual_seed(43))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_default_generator_is_seeded_by_torch_manual_seed():
    aug = CutNMix(peers=2)
    imgs, labels = images(8, 32, 32), torch.arange(8)
    torch.manual_seed(5)
    a = aug(imgs, labels)[0]
    torch.manual_seed(5)
    assert torch.equal(a, aug(imgs, labels)[0])


def test_apply_equals_call_and_draw_is_on_device():
    aug = CutNMix(peers=2, mode="cutmix", mix_prob=1.0)
    imgs, labels = images(6, 32, 32), torch.arange(6)
    params = aug.draw(6, imgs.device, torch.Generator().manual_seed(1))
    assert isinstance(params, CutNMixParams) and params.device == imgs.device and params.peers == 2
    direct = aug.apply(imgs, labels, params)
    called = aug(imgs, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(direct[0], called[0])


def test_non_cifar_size_and_non_contiguous_input():
    imgs = images(5, 20, 28)[:, :, ::2]  # non-contiguous [5,20,14,3]
    aug = CutNMix(peers=2, out_dtype=torch.float32, mix_prob=1.0)
    g = torch.Generator().manual_seed(0)
    views, *_ = aug(imgs, torch.arange(5), generator=g)
    params = aug.draw(5, "cpu", torch.Generator().manual_seed(0), 20, 14)
    assert torch.equal(
        views, numpy_cutnmix(imgs.contiguous(), torch.arange(5), params, mean=aug.mean, std=aug.std)[0]
    )


def test_auto_impl_choice(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu")) == ("numba" if numba_impl.available() else "torch")
    monkeypatch.setattr(numba_impl, "available", lambda: False)
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("reference", torch.device("cpu")) == "reference"


def test_impl_errors(monkeypatch):
    with pytest.raises(CnmError, match="unknown Cut\\^nMix implementation"):
        CutNMix(impl="cuda")
    with pytest.raises(CnmError, match="CPU tensors"):
        resolve_impl("numba", torch.device("cuda"))
    monkeypatch.setattr(numba_impl, "available", lambda: False)
    with pytest.raises(CnmError, match="numba is not installed"):
        resolve_impl("numba", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from pipeline import backends

    if backends.available("triton"):
        with pytest.raises(CnmError, match="needs CUDA tensors"):
            resolve_impl("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(peers=0), "peers"),
        (dict(mode="cutout"), "unknown Cut\\^nMix mode"),
        (dict(alpha=0.0), "alpha"),
        (dict(mix_prob=1.5), "mix_prob"),
        (dict(pad=-1), "pad"),
        (dict(std=(1.0, 0.0, 1.0)), "std positive"),
        (dict(mean=(1.0, 2.0)), "3 values"),
        (dict(out_dtype=torch.int8), "output dtype"),
        (dict(out_dtype="float64"), "output dtype"),
    ],
)
def test_bad_config_is_one_line_error(kwargs, message):
    with pytest.raises(CnmError, match=message) as err:
        CutNMix(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_inputs_are_one_line_errors():
    aug = CutNMix(peers=2)
    good = images(4, 32, 32)
    cases = [
        (good.float(), torch.arange(4), "uint8"),
        (good.permute(0, 3, 1, 2), torch.arange(4), "channels last"),
        (good, torch.arange(3), "labels"),
        (good, torch.zeros(4), "labels"),
        ([1, 2], torch.arange(4), "torch.Tensor"),
    ]
    for imgs, labels, message in cases:
        with pytest.raises(CnmError, match=message) as err:
            aug(imgs, labels)
        assert "\n" not in str(err.value)
    params = aug.draw(5, "cpu")
    with pytest.raises(CnmError, match="batch of 4"):
        aug.apply(good, torch.arange(4), params)
    with pytest.raises(CnmError, match="must be a CutNMixParams"):
        cutnmix(good, torch.arange(4), {"perm": 1})
    with pytest.raises(CnmError, match="inside the image"):
        bad = draw_params(4, 2, 32, 32, mix_prob=1.0, generator=torch.Generator().manual_seed(0))
        object.__setattr__(bad, "box_y", bad.box_y + 32)
        cutnmix(good, torch.arange(4), bad, impl="reference")


def test_generator_device_mismatch():
    with pytest.raises(CnmError, match="generator is on"):
        draw_params(4, 2, 32, 32, device="meta", generator=torch.Generator())  # a CPU generator


def test_params_round_trip_numpy():
    p = draw_params(7, 3, 32, 32, mode="cutmix", generator=torch.Generator().manual_seed(0))
    q = CutNMixParams.from_numpy(p.numpy())
    for f in ("offset_y", "offset_x", "flip", "perm", "mixed", "lam", "box_h", "box_w", "box_y", "box_x"):
        assert torch.equal(getattr(p, f), getattr(q, f)) and getattr(p, f).dtype == getattr(q, f).dtype
    assert (q.mode, q.pad) == ("cutmix", 4)


# ------------------------------------------------------------------ the per-sample numpy baseline


def test_numpy_baseline_built_from_cutnmix_or_kwargs():
    aug = CutNMix(
        peers=4, mode="cutmix", alpha=0.5, mix_prob=0.25, pad=2, flip=False, out_dtype=torch.float16
    )
    a, b = NumpyCutNMix(aug), NumpyCutNMix.from_aug(aug)
    c = NumpyCutNMix(
        peers=4, mode="cutmix", alpha=0.5, mix_prob=0.25, pad=2, flip=False, out_dtype=torch.float16
    )
    for n in (a, b, c):
        assert (n.peers, n.mode, n.alpha, n.mix_prob, n.pad, n.flip, n.out_dtype) == (
            4,
            "cutmix",
            0.5,
            0.25,
            2,
            False,
            torch.float16,
        )
    with pytest.raises(CnmError):
        NumpyCutNMix(mode="bad")


def test_numpy_sample_is_pad_crop_flip_per_peer():
    n = NumpyCutNMix(peers=5, pad=4)
    img = images(1, 32, 32)[0].numpy()
    out = n.sample(img, np.random.default_rng(0))
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    rng = np.random.default_rng(0)  # the same draws, replayed
    oy, ox, fl = rng.integers(0, 9, 5), rng.integers(0, 9, 5), rng.integers(0, 2, 5).astype(bool)
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = img
    for k in range(5):
        crop = padded[oy[k] : oy[k] + 32, ox[k] : ox[k] + 32]
        assert np.array_equal(out[k], crop[:, ::-1] if fl[k] else crop)
    identity = NumpyCutNMix(peers=2, pad=0, flip=False).sample(img, np.random.default_rng(1))
    assert np.array_equal(identity[1], img)


@pytest.mark.parametrize("mode", ["cutnmix", "cutmix", "mixup", "none"])
def test_numpy_collate_matches_its_draws(mode):
    n = NumpyCutNMix(peers=3, mode=mode, mix_prob=0.6, out_dtype=torch.bfloat16)
    imgs = images(11, 32, 32).numpy()
    rng = np.random.default_rng(3)
    base = np.stack([n.sample(im, rng) for im in imgs])  # [B,P,H,W,3], as the DataLoader collates
    labels = np.arange(11) * 2
    state = rng.bit_generator.state
    views, y_a, y_b, lam = n.collate(base, labels, rng)
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    d = n.draw_batch(11, 32, 32, replay)
    expected = mix_normalise_np(
        base,
        mode=mode,
        **{k: d[k] for k in ("perm", "lam", "box_h", "box_w", "box_y", "box_x")},
        mean32=n.mean32,
        inv_std32=n.inv_std32,
        out_dtype=torch.bfloat16,
    )
    assert torch.equal(views, expected)
    assert views.shape == (3, 11, 3, 32, 32) and views.dtype == torch.bfloat16
    assert all(views[k].is_contiguous(memory_format=torch.channels_last) for k in range(3))
    assert torch.equal(y_a, torch.as_tensor(labels)) and torch.equal(y_b, y_a[torch.as_tensor(d["perm"])])
    assert lam.dtype == torch.float32
    if mode in ("cutnmix", "cutmix"):
        area = (d["box_h"] * d["box_w"]).astype(np.float32)
        assert np.array_equal(lam.numpy(), np.float32(1) - area / np.float32(1024))
        assert (d["box_y"] + d["box_h"] <= 32).all() and (d["box_x"] + d["box_w"] <= 32).all()
        if mode == "cutmix":
            assert (d["box_y"] == d["box_y"][:1]).all()
    if mode == "none":
        assert torch.equal(y_b, y_a) and bool((lam == 1).all())


def test_numpy_cutnmix_equals_base_views_then_mixing():
    """numpy_cutnmix is exactly sample-level base views + batch mixing (the cpu loader's split)."""
    params = draw_params(6, 2, 32, 32, mix_prob=1.0, generator=torch.Generator().manual_seed(0))
    imgs = images(6, 32, 32)
    d = params.numpy()
    base = np.stack(
        [
            base_views_np(imgs[i].numpy(), d["offset_y"][:, i], d["offset_x"][:, i], d["flip"][:, i], 4)
            for i in range(6)
        ]
    )
    views = numpy_cutnmix(imgs, torch.arange(6), params, mean=MEAN, std=STD)[0]
    from pipeline.ops.params import norm_constants

    m, s = norm_constants(MEAN, STD)
    mixed = mix_normalise_np(
        base,
        mode="cutnmix",
        perm=d["perm"],
        lam=d["lam"],
        box_h=d["box_h"],
        box_w=d["box_w"],
        box_y=d["box_y"],
        box_x=d["box_x"],
        mean32=m,
        inv_std32=s,
        out_dtype=torch.float32,
    )
    assert torch.equal(views, mixed)


def test_auto_falls_back_to_torch_when_numba_fails(monkeypatch):
    if not numba_impl.available():
        pytest.skip("numba not installed")

    def broken(*args, **kwargs):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(numba_impl, "numba_cutnmix_views", broken)
    monkeypatch.setattr(numba_impl, "_disabled", None)
    imgs, labels = images(4, 32, 32), torch.arange(4)
    params = draw_params(4, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CnmError, match="numba Cut\\^nMix kernel failed"):
        cutnmix(imgs, labels, params, impl="numba")
    with pytest.warns(UserWarning, match="using the torch path"):
        views = cutnmix(imgs, labels, params, impl="auto")[0]
    assert torch.equal(views, cutnmix(imgs, labels, params, impl="torch")[0])
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
