"""The synthetic set: shapes, determinism, balance, and learnable (but not trivial) class structure."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import synthetic
from pipeline.errors import CnmError


@pytest.fixture(scope="module")
def small():
    return synthetic.make_synthetic(num_classes=10, train_size=2000, test_size=500, seed=0)


def test_shapes_dtypes_and_balance(small):
    for split, n in (("train", 2000), ("test", 500)):
        images, labels = small[split]
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        counts = np.bincount(labels, minlength=10)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    # it looks like images, not a constant: spread over the whole range in every channel
    x = small["train"][0]
    assert x.min() < 20 and x.max() > 235 and 30 < x.std() < 90


def test_deterministic_from_seed(small):
    again = synthetic.make_synthetic(num_classes=10, train_size=2000, test_size=500, seed=0)
    for split in small:
        np.testing.assert_array_equal(small[split][0], again[split][0])
        np.testing.assert_array_equal(small[split][1], again[split][1])
    other = synthetic.make_synthetic(num_classes=10, train_size=200, test_size=50, seed=1)
    assert not np.array_equal(other["train"][0], small["train"][0][:200])
    # train and test are different draws
    assert not np.array_equal(small["train"][0][:500], small["test"][0])


def _features(x: np.ndarray) -> np.ndarray:
    """Translation-invariant features: grey-level |FFT| and the colour of the most saturated pixels."""
    x = x.astype(np.float32) / 255
    g = x.mean(-1)
    g = g - g.mean((1, 2), keepdims=True)
    spec = np.abs(np.fft.rfft2(g))
    spec = spec / (spec.sum((1, 2), keepdims=True) + 1e-6)
    sat = x.max(-1) - x.min(-1)
    thr = np.quantile(sat.reshape(len(x), -1), 0.8, axis=1)[:, None, None]
    m = (sat >= thr)[..., None]
    col = (x * m).sum((1, 2)) / m.sum((1, 2))
    col = col / (col.sum(1, keepdims=True) + 1e-6)
    return np.concatenate([spec.reshape(len(x), -1) * 10, col * 3], 1)


def _ridge(a: np.ndarray, y: np.ndarray, at: np.ndarray, k: int = 10, lam: float = 0.1) -> np.ndarray:
    a = np.c_[a, np.ones(len(a))]
    at = np.c_[at, np.ones(len(at))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(k)[y])
    return (at @ w).argmax(1)


@pytest.fixture(scope="module")
def features(small):
    return _features(small["train"][0]), _features(small["test"][0])


def test_class_structure_is_learnable_and_flip_invariant(small, features):
    ytr, (xte, yte) = small["train"][1], small["test"]
    ftr, fte = features
    acc = (_ridge(ftr, ytr, fte) == yte).mean()
    assert acc > 0.7, acc  # chance is 0.1
    # a horizontal flip (the training augmentation) keeps every class's look
    flipped = (_ridge(ftr, ytr, _features(xte[:, :, ::-1])) == yte).mean()
    assert flipped > 0.7, flipped
    # the structure is in the labels: shuffled labels learn nothing
    shuffled = (_ridge(ftr, np.random.default_rng(0).permutation(ytr), fte) == yte).mean()
    assert shuffled < 0.2, shuffled


def test_not_trivially_separable(small, features):
    """Colour alone, or a nearest class mean on raw pixels, leaves most of the work undone."""
    (xtr, ytr), (xte, yte) = small["train"], small["test"]
    ftr, fte = features
    colour = (_ridge(ftr[:, -3:], ytr, fte[:, -3:]) == yte).mean()
    assert 0.2 < colour < 0.75, colour  # informative, not sufficient
    a, b = xtr.reshape(len(xtr), -1).astype(np.float32), xte.reshape(len(xte), -1).astype(np.float32)
    means = np.stack([a[ytr == k].mean(0) for k in range(10)])
    d = (b * b).sum(1)[:, None] - 2 * b @ means.T + (means * means).sum(1)[None]
    pixels = (d.argmin(1) == yte).mean()
    assert pixels < 0.5, pixels


def test_many_classes_and_names():
    d = synthetic.make_synthetic(num_classes=100, train_size=300, test_size=100, seed=2)
    assert d["train"][1].max() == 99 and len(np.unique(d["train"][1])) == 100
    names = synthetic.class_names(100)
    assert len(names) == len(set(names)) == 100
    assert synthetic.class_names(10)[4] == "rings-wide-hue144"


@pytest.mark.parametrize("kwargs,words", [
    ({"num_classes": 1}, "--num-classes"),
    ({"num_classes": 101}, "--num-classes"),
    ({"train_size": 0}, "--train-size"),
    ({"test_size": 0}, "--test-size"),
    ({"num_classes": 10, "train_size": 5}, "smaller than --num-classes"),
    ({"seed": -1}, "--seed"),
])
def test_bad_parameters(kwargs, words):
    params = {"num_classes": 10, "train_size": 100, "test_size": 10, "seed": 0, **kwargs}
    with pytest.raises(CnmError) as e:
        synthetic.make_synthetic(**params)
    assert words in str(e.value)
