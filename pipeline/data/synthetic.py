"""A small, learnable, CIFAR-shaped data set for offline use and tests (`--dataset synthetic`).

Each image is a textured disc (the object) on a textured background (the clutter). The class
decides two things about the disc, and nothing about anything else:

- its texture: one of ten patterns that are symmetric under a horizontal flip, so the usual
  flip augmentation keeps the label: horizontal stripes, vertical stripes, plaid (the sum of
  both), checker (their product) and concentric rings, each at a wide (~9 px) or fine (~4.5 px)
  period; class k has pattern k mod 10.
- its hue: class k's hue is k/K of the colour wheel, jittered per image by a normal draw of
  standard deviation min(0.06, 0.5/K) turns, so neighbouring hues overlap (hue alone gets
  about half of a 10-class set right) and classes that share a pattern (K > 10) stay apart
  by hue.

Everything else is drawn per image, independent of the label: the disc's centre (anywhere in
the middle 16x16), radius (7..12 px), saturation, brightness, the pattern's phase and a +-10%
frequency jitter; the background's hue, saturation, brightness and gradient, plus a faint
distractor pattern drawn from the same ten; then additive pixel noise. A model must find the
disc and read its texture and colour. Measured on the default 10 classes (chance 0.10), 2000
train / 500 test images (tests/pipeline/test_synthetic.py checks these with margins): a
nearest class mean on raw pixels gets 0.39, a linear model on raw pixels 0.22, hue alone
0.55; a linear model on translation-invariant features (|FFT| + colour of the most saturated
pixels) 0.90. A 3-stage ResNet (16/32/64 channels, one block each) trained on the default 5000
images with pad-4 crop and flip reached 0.76 test accuracy after 2 epochs (80 steps of 128)
on 2 shared CPU cores: learnable quickly, not in one step.

`difficulty` (0..1, default 0: the set above, byte for byte) makes the set harder so methods can
be told apart: at d the hue jitter is (1 + 3d)x wider, the object's texture contrast (1 - 0.6d)x,
the disc's radius 3d px smaller, the distractor pattern up to 0.12 + 0.4d strong (it comes from
the same ten class patterns, so it competes with the object's texture) and the pixel noise
0.05 + 0.15d. A ridge model on the features above (1000 train / 400 test) gets 0.89 at d = 0,
0.76 at 0.2, 0.50 at 0.5 and chance at 1 (bands checked in tests/pipeline/test_synthetic.py).

`object_scale` (0.5..2, default 1) multiplies the disc's radius and changes nothing else: the disc
covers about 22% of the frame at difficulty 0.4 and 40% at scale 1.4. It tests whether the
object's size is why mixed samples cost accuracy on this set (a box that hides a small object
leaves an area label the pixels do not show); at difficulty 0.7 and scale 1.4 they still did
(docs/design.md#evidence).

Deterministic: the same (num_classes, train_size, test_size, seed, difficulty, object_scale) gives the same bytes with
the same numpy build (PCG64 `default_rng` streams, fixed chunking); numpy builds whose float32
cos/sqrt differ in the last bit may round a rare pixel differently. Train and test are
independent draws from the same distribution. Labels are balanced (counts differ by at most one).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import CnmError

GENERATOR = "cnm-synthetic-v1"  # bump when the images change for a given seed
PATTERNS = ("h-stripes", "v-stripes", "plaid", "checker", "rings")
PERIODS = {"wide": 9.0, "fine": 4.5}  # pixels per cycle
MAX_CLASSES = 100
MAX_SIZE = 1_000_000
CHUNK = 1024  # images generated at a time; fixed so the output never depends on memory


def class_names(num_classes: int) -> list[str]:
    """e.g. "rings-fine-hue252": pattern, period and the class's hue in degrees."""
    names = []
    for k in range(num_classes):
        t = k % 10
        period = "wide" if t < 5 else "fine"
        names.append(f"{PATTERNS[t % 5]}-{period}-hue{round(360 * k / num_classes) % 360:03d}")
    return names


def check_params(num_classes: int, train_size: int, test_size: int, seed: int,
                 difficulty: float = 0.0, object_scale: float = 1.0) -> None:
    """One-line CnmError for parameters that make no data set."""
    if not 0.0 <= difficulty <= 1.0:
        raise CnmError(f"--difficulty must be between 0 and 1, got {difficulty}")
    if not 0.5 <= object_scale <= 2.0:
        raise CnmError(f"--object-scale must be between 0.5 and 2, got {object_scale}")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise CnmError(f"--num-classes must be between 2 and {MAX_CLASSES}, got {num_classes}")
    for flag, n in (("--train-size", train_size), ("--test-size", test_size)):
        if not 1 <= n <= MAX_SIZE:
            raise CnmError(f"{flag} must be between 1 and {MAX_SIZE}, got {n}")
    if train_size < num_classes:
        raise CnmError(f"--train-size {train_size} is smaller than --num-classes {num_classes}: "
                       f"some classes would have no training image")
    if not 0 <= seed < 2 ** 63:
        raise CnmError(f"--seed must be a non-negative integer below 2**63, got {seed}")


def make_synthetic(num_classes: int = 10, train_size: int = 5000, test_size: int = 1000,
                   seed: int = 0, difficulty: float = 0.0,
                   object_scale: float = 1.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images uint8 [N,32,32,3], labels int64 [N]), "test": (...)}."""
    check_params(num_classes, train_size, test_size, seed, difficulty, object_scale)
    out = {}
    for stream, (split, n) in enumerate((("train", train_size), ("test", test_size))):
        rng = np.random.default_rng([seed, stream])
        labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
        images = np.empty((n, 32, 32, 3), np.uint8)
        for start in range(0, n, CHUNK):
            y = labels[start:start + CHUNK]
            images[start:start + len(y)] = render(y, num_classes, rng, difficulty, object_scale)
        out[split] = (images, labels)
    return out


def source_identity(num_classes: int, train_size: int, test_size: int, seed: int,
                    difficulty: float = 0.0, object_scale: float = 1.0) -> dict:
    """What a prepared directory records; `difficulty` only when it is not 0 and `object_scale`
    only when it is not 1 (so directories prepared before the knobs existed stay up to date)."""
    ident = {"kind": "synthetic", "dataset": "synthetic", "generator": GENERATOR,
             "num_classes": num_classes, "train_size": train_size, "test_size": test_size, "seed": seed}
    if difficulty:
        ident["difficulty"] = float(difficulty)
    if object_scale != 1.0:
        ident["object_scale"] = float(object_scale)
    return ident


# --------------------------------------------------------------------------- rendering

_YY, _XX = np.meshgrid(np.arange(32, dtype=np.float32), np.arange(32, dtype=np.float32), indexing="ij")


def _u(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n uniforms in [lo, hi) as float32 [n,1,1] (broadcast over the image)."""
    return rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]


def pattern(kind: np.ndarray, freq: np.ndarray, phase1: np.ndarray, phase2: np.ndarray,
            cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Texture in [-1, 1], float32 [n,32,32].

    kind int [n] in 0..4 (PATTERNS); freq (cycles/px), phases and centre (cy, cx) float32
    [n,1,1]. Every pattern is symmetric under x -> -x about its centre up to its phase, so a
    horizontal flip maps a class's texture onto the same class's texture.
    """
    n = len(kind)
    out = np.empty((n, 32, 32), np.float32)
    w = np.float32(2 * math.pi) * freq
    for k in range(len(PATTERNS)):
        sel = np.flatnonzero(kind == k)
        if not len(sel):
            continue
        v = _YY[None] - cy[sel]
        u = _XX[None] - cx[sel]
        ws, p1, p2 = w[sel], phase1[sel], phase2[sel]
        if k == 0:
            tex = np.cos(ws * v + p1)
        elif k == 1:
            tex = np.cos(ws * u + p2)
        elif k == 2:
            tex = 0.5 * (np.cos(ws * v + p1) + np.cos(ws * u + p2))
        elif k == 3:
            tex = np.cos(ws * v + p1) * np.cos(ws * u + p2)
        else:
            tex = np.cos(ws * np.sqrt(u * u + v * v) + p1)
        out[sel] = tex
    return out


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0,1] (h in turns, any real) float32 [...] -> RGB float32 [..., 3].

    RGB is linear in v for fixed (h, s), which `render` uses to scale colours by a texture.
    """
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h)
    f = h - i
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1).astype(np.float32)


def render(labels: np.ndarray, num_classes: int, rng: np.random.Generator,
           difficulty: float = 0.0, object_scale: float = 1.0) -> np.ndarray:
    """Images of the given labels (int [n]) -> uint8 [n,32,32,3]; draws from `rng` only.

    Every difficulty draws the same values in the same order; `difficulty` only scales them
    (and 0 scales by exactly 1 / adds exactly 0, so d = 0 is the original set bit for bit)."""
    d = float(difficulty)
    labels = np.asarray(labels)
    n = len(labels)
    # the object: class texture and hue
    t = labels % 10
    freq = np.where(t < 5, 1 / PERIODS["wide"], 1 / PERIODS["fine"]).astype(np.float32)[:, None, None]
    freq = freq * _u(rng, n, 0.9, 1.1)
    cy, cx = _u(rng, n, 8, 24), _u(rng, n, 8, 24)
    radius = _u(rng, n, 7 - 3 * d, 12 - 3 * d) * np.float32(object_scale)
    tex = pattern(t % 5, freq, _u(rng, n, 0, 2 * math.pi), _u(rng, n, 0, 2 * math.pi), cy, cx)
    sigma = min(0.06, 0.5 / num_classes) * (1 + 3 * d)
    hue = labels / num_classes + rng.normal(0, sigma, n)
    colour = hsv_to_rgb(hue, rng.uniform(0.5, 1.0, n), rng.uniform(0.55, 0.95, n))  # [n,3]
    fg = (0.6 + 0.4 * (1 - 0.6 * d) * tex)[..., None] * colour[:, None, None, :]
    dist = np.sqrt((_YY[None] - cy) ** 2 + (_XX[None] - cx) ** 2)
    mask = np.clip((radius - dist) / 1.5 + 0.5, 0, 1)[..., None]
    # the clutter: a dull colour unrelated to the label, a gradient, a faint random pattern
    bkind = rng.integers(0, len(PATTERNS), n)
    bfreq = np.where(rng.random(n) < 0.5, 1 / PERIODS["wide"], 1 / PERIODS["fine"]).astype(np.float32)
    btex = pattern(bkind, bfreq[:, None, None], _u(rng, n, 0, 2 * math.pi), _u(rng, n, 0, 2 * math.pi),
                   _u(rng, n, 0, 32), _u(rng, n, 0, 32))
    angle = _u(rng, n, 0, 2 * math.pi)
    grad = ((_XX[None] - 15.5) * np.cos(angle) + (_YY[None] - 15.5) * np.sin(angle)) / 32
    bval = np.clip(_u(rng, n, 0.25, 0.75) + _u(rng, n, 0, 0.4) * grad + _u(rng, n, 0, 0.12 + 0.4 * d) * btex, 0, 1)
    bcolour = hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.35, n), np.ones(n))  # [n,3]
    bg = bval[..., None] * bcolour[:, None, None, :]
    img = mask * fg + (1 - mask) * bg
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.05 + 0.15 * d)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
