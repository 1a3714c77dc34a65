"""Cut^nMix the way a competent user writes it without cnm: per sample, in numpy, on the CPU.

This is the CPU-augment baseline of `cnm bench` and of the `cpu` loader (docs/design.md#cutnmix-views and
docs/performance.md): pad-crop-flip runs per sample in DataLoader workers (`NumpyCutNMix.sample`),
then the batch is mixed and normalised on the CPU in the collate function
(`NumpyCutNMix.collate`). `numpy_cutnmix` is the same code driven by given `CutNMixParams`: a
deterministic per-sample implementation of the whole op that the benchmark times against the
vectorised path and that the tests check equals the reference, bit for bit in float32.

Semantics (see `pipeline.ops.params`): zero-pad, crop at (oy, ox), then flip; boxes paste the
partner's peer-k base view; mixup blends normalised views; norm(p) = (p - mean32) * inv_std32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.ops.params import (
    BOX_MODES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CutNMixParams,
    check_config,
    norm_constants,
    resolve_dtype,
)

_KWARGS = ("peers", "mode", "alpha", "mix_prob", "pad", "flip", "mean", "std", "out_dtype")


def base_views_np(img: np.ndarray, offset_y, offset_x, flip, pad: int) -> np.ndarray:
    """One sample's P base views: uint8 [H,W,3] -> uint8 [P,H,W,3] (zero-pad, crop, then flip).

    offset_y/offset_x/flip: [P] sequences (crop offsets in [0, 2*pad] of the padded image).
    """
    h, w, _ = img.shape
    if pad:
        padded = np.zeros((h + 2 * pad, w + 2 * pad, 3), dtype=np.uint8)
        padded[pad : pad + h, pad : pad + w] = img
    else:
        padded = img
    out = np.empty((len(offset_y), h, w, 3), dtype=np.uint8)
    for k, (oy, ox, f) in enumerate(zip(offset_y, offset_x, flip)):
        crop = padded[oy : oy + h, ox : ox + w]
        out[k] = crop[:, ::-1] if f else crop
    return out


def normalise_np(x: np.ndarray, mean32: np.ndarray, inv_std32: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x - mean32) * inv_std32 (the exact float32 formula)."""
    return (x.astype(np.float32) - mean32) * inv_std32


def mix_normalise_np(
    base: np.ndarray,
    *,
    mode: str,
    perm: np.ndarray,
    lam: np.ndarray,
    box_h: np.ndarray,
    box_w: np.ndarray,
    box_y: np.ndarray,
    box_x: np.ndarray,
    mean32: np.ndarray,
    inv_std32: np.ndarray,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Batch mixing + normalisation on the CPU.

    base: uint8 [B,P,H,W,3] (base views, as collated from the workers); perm int [B]; lam float32
    [B]; box_h/box_w int [B]; box_y/box_x int [P,B]. Returns views torch [P,B,3,H,W] out_dtype,
    each views[k] channels-last.
    """
    b, p = base.shape[:2]
    # a copy, always: pastes must read the untouched base views (for P=1 the transpose is
    # already contiguous and ascontiguousarray would alias `base`)
    views = base.transpose(1, 0, 2, 3, 4).copy()  # [P,B,H,W,3]
    if mode in BOX_MODES:
        for i in range(b):  # paste each sample's boxes from its partner, peer by peer
            h, w = int(box_h[i]), int(box_w[i])
            if h == 0 or w == 0:
                continue
            j = int(perm[i])
            for k in range(p):
                y, x = int(box_y[k, i]), int(box_x[k, i])
                views[k, i, y : y + h, x : x + w] = base[j, k, y : y + h, x : x + w]
        out = normalise_np(views, mean32, inv_std32)
    elif mode == "mixup":
        na = normalise_np(views, mean32, inv_std32)
        nb = na[:, np.asarray(perm, dtype=np.int64)]
        lam32 = np.asarray(lam, dtype=np.float32).reshape(1, b, 1, 1, 1)
        out = lam32 * na + (np.float32(1.0) - lam32) * nb
    else:
        out = normalise_np(views, mean32, inv_std32)
    t = torch.from_numpy(out)
    if out_dtype != torch.float32:
        t = t.to(out_dtype)
    return t.permute(0, 1, 4, 2, 3)  # [P,B,3,H,W], each views[k] channels-last


def numpy_cutnmix(
    images,
    labels,
    params: CutNMixParams | dict,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype=torch.float32,
):
    """The whole op, per sample in numpy, from given params (deterministic).

    images uint8 [B,H,W,3] (numpy or CPU torch); labels [B]; params a CutNMixParams or its
    `.numpy()` dict. Returns (views [P,B,3,H,W] out_dtype channels-last per peer, y_a int64 [B],
    y_b int64 [B], lam float32 [B]) as CPU torch tensors.
    """
    d = params.numpy() if isinstance(params, CutNMixParams) else params
    imgs = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    mean32, inv_std32 = norm_constants(mean, std)
    base = np.stack(
        [
            base_views_np(imgs[i], d["offset_y"][:, i], d["offset_x"][:, i], d["flip"][:, i], d["pad"])
            for i in range(imgs.shape[0])
        ]
    )
    views = mix_normalise_np(
        base,
        mode=d["mode"],
        perm=d["perm"],
        lam=d["lam"],
        box_h=d["box_h"],
        box_w=d["box_w"],
        box_y=d["box_y"],
        box_x=d["box_x"],
        mean32=mean32,
        inv_std32=inv_std32,
        out_dtype=resolve_dtype(out_dtype),
    )
    y_a = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)).long()
    perm = torch.as_tensor(np.asarray(d["perm"], dtype=np.int64))
    return views, y_a, y_a[perm], torch.as_tensor(np.asarray(d["lam"], dtype=np.float32))


class NumpyCutNMix:
    """The CPU-augment baseline, split the way a DataLoader runs it.

    Build it from a `CutNMix` (`NumpyCutNMix(aug)` or `NumpyCutNMix.from_aug(aug)`) or from the
    same keyword arguments (peers, mode, alpha, mix_prob, pad, flip, mean, std, out_dtype).

    - `sample(img u8 [H,W,3], rng) -> u8 [P,H,W,3]`: per-sample pad-crop-flip, once per peer
      (runs in the DataLoader workers).
    - `collate(base_views u8 [B,P,H,W,3], labels [B], rng) -> (views, y_a, y_b, lam)`: batch
      mixing and normalisation on the CPU; views torch [P,B,3,H,W] out_dtype (each views[k]
      channels-last), y_a/y_b int64 [B], lam float32 [B].

    Randomness comes from numpy Generators with the same distributions as `draw_params`
    (offsets uniform on [0, 2*pad], fair flips, Beta(alpha, alpha), box side round(H*sqrt(1-l)),
    positions uniform inside the image); the draws themselves differ from the torch ones.
    """

    def __init__(self, aug=None, **kwargs):
        if aug is not None:
            if kwargs:
                raise TypeError("give either a CutNMix or keyword arguments, not both")
            kwargs = {k: getattr(aug, k) for k in _KWARGS}
        cfg = dict(
            peers=3,
            mode="cutnmix",
            alpha=1.0,
            mix_prob=0.5,
            pad=4,
            flip=True,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            out_dtype=torch.float32,
        )
        unknown = set(kwargs) - set(cfg)
        if unknown:
            raise TypeError(f"unknown arguments: {sorted(unknown)}")
        cfg.update(kwargs)
        check_config(cfg["peers"], cfg["mode"], cfg["alpha"], cfg["mix_prob"], cfg["pad"])
        for k, v in cfg.items():
            setattr(self, k, v)
        self.out_dtype = resolve_dtype(cfg["out_dtype"])
        self.mean32, self.inv_std32 = norm_constants(cfg["mean"], cfg["std"])

    @classmethod
    def from_aug(cls, aug) -> "NumpyCutNMix":
        return cls(aug)

    def __repr__(self) -> str:
        return (
            f"NumpyCutNMix(peers={self.peers}, mode={self.mode!r}, alpha={self.alpha}, "
            f"mix_prob={self.mix_prob}, pad={self.pad}, flip={self.flip})"
        )

    def sample(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [H,W,3] -> uint8 [P,H,W,3]: this sample's base view for every peer."""
        p = self.peers
        oy = rng.integers(0, 2 * self.pad + 1, size=p)
        ox = rng.integers(0, 2 * self.pad + 1, size=p)
        fl = rng.integers(0, 2, size=p).astype(bool) if self.flip else np.zeros(p, dtype=bool)
        return base_views_np(np.asarray(img), oy, ox, fl, self.pad)

    def draw_batch(self, batch: int, height: int, width: int, rng: np.random.Generator) -> dict:
        """The batch-level draws (perm, mixed, lam, boxes) as numpy arrays, same laws as draw_params."""
        b, p = batch, self.peers
        perm = rng.permutation(b)
        mixed = rng.random(b) < self.mix_prob
        beta = rng.beta(self.alpha, self.alpha, size=b).astype(np.float32)
        box_h = np.zeros(b, dtype=np.int64)
        box_w = np.zeros(b, dtype=np.int64)
        box_y = np.zeros((p, b), dtype=np.int64)
        box_x = np.zeros((p, b), dtype=np.int64)
        lam = np.ones(b, dtype=np.float32)
        if self.mode in BOX_MODES:
            side = np.sqrt(np.float32(1.0) - beta)
            box_h = np.where(mixed, np.round(side * height), 0).astype(np.int64)
            box_w = np.where(mixed, np.round(side * width), 0).astype(np.int64)
            n_pos = 1 if self.mode == "cutmix" else p
            uy = np.broadcast_to(rng.random((n_pos, b)), (p, b))
            ux = np.broadcast_to(rng.random((n_pos, b)), (p, b))
            box_y = np.minimum(np.floor(uy * (height - box_h + 1)), height - box_h).astype(np.int64)
            box_x = np.minimum(np.floor(ux * (width - box_w + 1)), width - box_w).astype(np.int64)
            lam = np.float32(1.0) - (box_h * box_w).astype(np.float32) / np.float32(height * width)
        elif self.mode == "mixup":
            lam = np.where(mixed, beta, np.float32(1.0)).astype(np.float32)
        else:
            perm = np.arange(b)
            mixed = np.zeros(b, dtype=bool)
        return dict(
            perm=perm,
            mixed=mixed,
            lam=lam.astype(np.float32),
            box_h=box_h,
            box_w=box_w,
            box_y=box_y,
            box_x=box_x,
        )

    def collate(self, base_views, labels, rng: np.random.Generator):
        """uint8 [B,P,H,W,3] base views + labels [B] -> (views, y_a, y_b, lam), see the class doc."""
        base = base_views.numpy() if isinstance(base_views, torch.Tensor) else np.asarray(base_views)
        b, p, h, w, _ = base.shape
        if p != self.peers:
            raise ValueError(f"expected base views of {self.peers} peers, got {p}")
        d = self.draw_batch(b, h, w, rng)
        views = mix_normalise_np(
            base,
            mode=self.mode,
            perm=d["perm"],
            lam=d["lam"],
            box_h=d["box_h"],
            box_w=d["box_w"],
            box_y=d["box_y"],
            box_x=d["box_x"],
            mean32=self.mean32,
            inv_std32=self.inv_std32,
            out_dtype=self.out_dtype,
        )
        y_a = torch.as_tensor(np.asarray(labels)).long()
        return views, y_a, y_a[torch.as_tensor(d["perm"], dtype=torch.int64)], torch.from_numpy(d["lam"])
