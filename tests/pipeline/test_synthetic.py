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


@pytest.mark.parametrize("difficulty,band", [
    (0.2, (0.68, 0.84)),    # measured 0.758 (seed 0), 0.760 (seed 1); 0.895 at difficulty 0
    (0.5, (0.40, 0.60)),    # measured 0.500, 0.493
])
def test_difficulty_bounds(difficulty, band):
    """The difficulty knob takes a small model (ridge on the translation-invariant features,
    1000 train / 400 test images) from 0.89 at d = 0 down into a documented band, and leaves
    colour alone far from sufficient."""
    d = synthetic.make_synthetic(num_classes=10, train_size=1000, test_size=400, seed=0, difficulty=difficulty)
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    ftr, fte = _features(xtr), _features(xte)
    acc = (_ridge(ftr, ytr, fte) == yte).mean()
    assert band[0] < acc < band[1], acc
    colour = (_ridge(ftr[:, -3:], ytr, fte[:, -3:]) == yte).mean()
    assert colour < 0.45, colour


def test_difficulty_is_deterministic_and_keeps_the_labels():
    a = synthetic.make_synthetic(num_classes=10, train_size=120, test_size=30, seed=3, difficulty=0.7)
    b = synthetic.make_synthetic(num_classes=10, train_size=120, test_size=30, seed=3, difficulty=0.7)
    easy = synthetic.make_synthetic(num_classes=10, train_size=120, test_size=30, seed=3)
    zero = synthetic.make_synthetic(num_classes=10, train_size=120, test_size=30, seed=3, difficulty=0.0)
    for split in a:
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], easy[split][1])       # same labels, same order
        np.testing.assert_array_equal(zero[split][0], easy[split][0])    # 0 is the default set
        assert not np.array_equal(a[split][0], easy[split][0])
    # the same draws, scaled: noisier images (more pixel noise, stronger clutter)
    assert np.abs(np.diff(a["train"][0].astype(np.float32), axis=2)).mean() > \
        np.abs(np.diff(easy["train"][0].astype(np.float32), axis=2)).mean()


@pytest.mark.parametrize("difficulty", [-0.1, 1.5])
def test_bad_difficulty(difficulty):
    with pytest.raises(CnmError, match="--difficulty must be between 0 and 1"):
        synthetic.make_synthetic(num_classes=10, train_size=100, test_size=10, difficulty=difficulty)


def test_object_scale_grows_the_object_and_nothing_else():
    """`object_scale` multiplies the disc's radius: 1 is the default set byte for byte, the labels
    and every other draw stay, so only the pixels the larger disc newly covers change."""
    base = synthetic.make_synthetic(num_classes=10, train_size=200, test_size=20, seed=2, difficulty=0.4)
    one = synthetic.make_synthetic(num_classes=10, train_size=200, test_size=20, seed=2, difficulty=0.4,
                                   object_scale=1.0)
    big = synthetic.make_synthetic(num_classes=10, train_size=200, test_size=20, seed=2, difficulty=0.4,
                                   object_scale=1.4)
    np.testing.assert_array_equal(one["train"][0], base["train"][0])
    np.testing.assert_array_equal(big["train"][1], base["train"][1])

    # only the ring between the two radii changes: (1.4^2 - 1) x the disc's ~22% of the frame at
    # d = 0.4, plus the soft edges, less where the larger disc leaves the frame (measured 0.267)
    changed = (big["train"][0] != base["train"][0]).any(-1).mean()
    assert 0.15 < changed < 0.40, changed


@pytest.mark.parametrize("scale", [0.4, 2.5])
def test_bad_object_scale(scale):
    with pytest.raises(CnmError, match="--object-scale must be between 0.5 and 2"):
        synthetic.make_synthetic(num_classes=10, train_size=100, test_size=10, object_scale=scale)


def test_identity_records_the_knobs_only_when_set():
    assert "difficulty" not in synthetic.source_identity(10, 100, 10, 0)
    assert "object_scale" not in synthetic.source_identity(10, 100, 10, 0, 0.5, 1.0)
    assert synthetic.source_identity(10, 100, 10, 0, 0.5)["difficulty"] == 0.5
    assert synthetic.source_identity(10, 100, 10, 0, 0.0, 1.4)["object_scale"] == 1.4


def test_prepare_and_cli_difficulty(tmp_path):
    """`cnm prepare --dataset synthetic --difficulty D --object-scale S`: recorded in the manifest,
    part of what makes an existing directory up to date, and refused for CIFAR."""
    from click.testing import CliRunner

    from cnm.cli import cli
    from pipeline.data.prepare import prepare

    out = tmp_path / "hard"
    res = CliRunner().invoke(cli, ["prepare", "--dataset", "synthetic", "--num-classes", "4", "--train-size",
                                    "40", "--test-size", "12", "--difficulty", "0.5", "--object-scale",
                                    "1.5", "--no-beton", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "difficulty 0.5, object scale 1.5" in res.output
    man = prepare("synthetic", out, num_classes=4, train_size=40, test_size=12, difficulty=0.5,
                  object_scale=1.5).manifest
    assert man.source["difficulty"] == 0.5 and man.source["object_scale"] == 1.5
    ref = synthetic.make_synthetic(4, 40, 12, 0, difficulty=0.5, object_scale=1.5)
    np.testing.assert_array_equal(man.load_split("train")[0], ref["train"][0])
    with pytest.raises(CnmError, match="difficulty 0.5, object scale 1.5.*--force"):
        prepare("synthetic", out, num_classes=4, train_size=40, test_size=12, difficulty=0.5, beton=False)
    with pytest.raises(CnmError, match="--difficulty only apply to --dataset synthetic"):
        prepare("cifar10", tmp_path / "c", download=True, difficulty=0.5)
    with pytest.raises(CnmError, match="--object-scale only apply to --dataset synthetic"):
        prepare("cifar10", tmp_path / "c", download=True, object_scale=1.5)
