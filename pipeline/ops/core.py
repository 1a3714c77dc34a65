"""Cut^nMix: the functional core `cutnmix` and the thin `CutNMix` wrapper that draws its params.

Cut^nMix (Shen, Xu, Yang, Li, Guo, "Mixed Sample Augmentation for Online Distillation",
arXiv 2206.12370; this project's formulation in docs/design.md#cutnmix-views): every peer gets its
own pad-crop-flip base view of every sample; one partner permutation per batch; per sample a
box size (from lam ~ Beta(alpha, alpha)) shared by all peers, at a different position for every
peer, filled with the partner's view of that peer; lam = 1 - box area / image area. Variants:
cutmix (one shared position), mixup, none. Exact semantics: `pipeline.ops.params`.

Implementations of the one core (`impl`):
    "reference"  per-pixel Python (`pipeline.ops.reference`): the oracle, slow
    "torch"      vectorised torch (`pipeline.ops.torch_impl`): any device, no host sync
    "numba"      compiled CPU kernel (`pipeline.ops.numba_impl`): the fast CPU path
    "triton"     fused GPU kernel (`pipeline.ops.triton_impl`): CUDA (or TRITON_INTERPRET=1)
    "auto"       triton on CUDA when triton imports, else torch; on CPU numba when it imports,
                 else torch
"""

from __future__ import annotations

import copy

import os
from typing import Sequence

import torch

from pipeline import backends
from pipeline.errors import CnmError
from pipeline.ops import numba_impl
from pipeline.ops.params import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CutNMixParams,
    check_config,
    check_images,
    check_params,
    draw_params,
    norm_constants,
    resolve_dtype,
)
from pipeline.ops.reference import reference_cutnmix
from pipeline.ops.torch_impl import torch_cutnmix_views

IMPLS = ("auto", "reference", "torch", "numba", "triton")
LAYOUTS = ("peers", "grouped")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` means on `device` ("auto" resolved); CnmError if impossible."""
    if impl not in IMPLS:
        raise CnmError(f"unknown Cut^nMix implementation {impl!r}: choose one of {', '.join(IMPLS)}")
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda":
            return "triton" if backends.available("triton") else "torch"
        return "numba" if device.type == "cpu" and numba_impl.available() else "torch"
    if impl == "numba":
        if device.type != "cpu":
            raise CnmError(f"the numba Cut^nMix runs on CPU tensors, not {device}: use impl='auto'")
        if not numba_impl.available():
            raise CnmError("numba is not installed (needed for impl='numba'): pip install numba")
    if impl == "triton":
        backends.require("triton", "the Triton Cut^nMix kernel")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise CnmError(
                f"the Triton Cut^nMix kernel needs CUDA tensors (got {device}); "
                "set TRITON_INTERPRET=1 to run it on the CPU interpreter"
            )
    return impl


def cutnmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    params: CutNMixParams,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    out_dtype: torch.dtype = torch.bfloat16,
    impl: str = "auto",
    layout: str = "peers",
):
    """The functional core: a pure function of the images and the drawn parameters.

    images uint8 [B,H,W,3] (any device), labels int [B], params a `CutNMixParams` for P peers and
    this batch, on the images' device. Returns, on images.device:
        views  out_dtype [P,B,3,H,W], each views[k] channels-last: (pixels - mean) / std
        y_a    int64 [B] = labels
        y_b    int64 [B] = labels[perm]
        lam    float32 [B]: weight of y_a (1.0 where a sample is not mixed)
    With layout="grouped", views is instead out_dtype [B,P*3,H,W] channels-last, peer k's
    channels at 3k:3k+3: the input of the grouped peers network (what
    `trainer.peers.views_to_grouped_input` makes of the "peers" views); the Triton kernel writes
    it directly, the other implementations convert (one copy).
    No host synchronisation except with impl="reference" (and the CPU kernels, which run on the
    host anyway).
    """
    b, h, w = check_images(images)
    dtype = resolve_dtype(out_dtype)
    mean32, inv_std32 = norm_constants(mean, std)
    if not isinstance(labels, torch.Tensor) or labels.shape != (b,) or labels.is_floating_point():
        got = (
            f"{labels.dtype} {list(labels.shape)}"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise CnmError(f"labels must be an integer tensor [B] = [{b}], got {got}")
    check_params(params, b, images.device)
    if layout not in LAYOUTS:
        raise CnmError(f"unknown Cut^nMix output layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    which = resolve_impl(impl, images.device)
    if which == "reference":
        views, y_a, y_b, lam = reference_cutnmix(images, labels, params, mean=mean, std=std, out_dtype=dtype)
        return (grouped_layout(views) if layout == "grouped" else views), y_a, y_b, lam
    images = images.contiguous()
    views = None
    if which == "numba":
        try:
            views = numba_impl.numba_cutnmix_views(images, params, mean32, inv_std32, dtype)
        except Exception as err:  # a numba that imports but cannot compile (version clash)
            if impl != "auto":
                raise CnmError(f"the numba Cut^nMix kernel failed: {type(err).__name__}: {err}") from None
            numba_impl.disable(f"{type(err).__name__}: {err}")  # warns once; auto -> torch from now on
            which = "torch"
    if which == "triton":
        from pipeline.ops.triton_impl import triton_cutnmix_views

        views = triton_cutnmix_views(images, params, mean32, inv_std32, dtype, layout=layout)
    else:
        if which == "torch":
            views = torch_cutnmix_views(images, params, mean32, inv_std32, dtype)
        if layout == "grouped":
            views = grouped_layout(views)
    y_a = labels.to(device=images.device, dtype=torch.int64)
    return views, y_a, y_a[params.perm], params.lam


def grouped_layout(views: torch.Tensor) -> torch.Tensor:
    """views [P,B,3,H,W] (each views[k] channels-last) -> [B,P*3,H,W] channels-last (one copy),
    peer k's channels at 3k:3k+3."""
    P, B, C, H, W = views.shape
    return views.permute(1, 3, 4, 0, 2).reshape(B, H, W, P * C).permute(0, 3, 1, 2)


class CutNMix:
    """Cut^nMix as a callable: draws the batch's parameters, then applies `cutnmix`.

        aug = CutNMix(peers=3, mode="cutnmix", alpha=1.0, mix_prob=0.5, pad=4, flip=True,
                      mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7), out_dtype=torch.bfloat16)
        views, y_a, y_b, lam = aug(images, labels, generator=g)

    images uint8 [B,H,W,3] on any device; views [P,B,3,H,W] out_dtype on the same device, each
    views[k] channels-last; y_b = y_a[perm]; lam float32 [B], 1.0 where a sample is not mixed.
    mode: "cutnmix" (per-peer box positions), "cutmix" (one position), "mixup", "none".
    mean/std in pixel units (0..255). pad=0 and flip=False make the base view the identity.
    layout="grouped": views [B,P*3,H,W] channels-last instead (see `cutnmix`).
    """

    def __init__(
        self,
        peers: int = 3,
        mode: str = "cutnmix",
        alpha: float = 1.0,
        mix_prob: float = 0.5,
        pad: int = 4,
        flip: bool = True,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        out_dtype=torch.bfloat16,
        impl: str = "auto",
        layout: str = "peers",
    ):
        check_config(peers, mode, alpha, mix_prob, pad)
        norm_constants(mean, std)  # validates
        if impl not in IMPLS:
            raise CnmError(f"unknown Cut^nMix implementation {impl!r}: choose one of {', '.join(IMPLS)}")
        self.peers, self.mode, self.alpha, self.mix_prob = int(peers), mode, float(alpha), float(mix_prob)
        self.pad, self.flip = int(pad), bool(flip)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.out_dtype = resolve_dtype(out_dtype)
        if layout not in LAYOUTS:
            raise CnmError(f"unknown Cut^nMix output layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        self.impl = impl
        self.layout = layout

    def __repr__(self) -> str:
        return (
            f"CutNMix(peers={self.peers}, mode={self.mode!r}, alpha={self.alpha}, mix_prob={self.mix_prob}, "
            f"pad={self.pad}, flip={self.flip}, out_dtype={self.out_dtype}, impl={self.impl!r}, "
            f"layout={self.layout!r})"
        )

    def with_layout(self, layout: str) -> CutNMix:
        """The same op (same parameters, same draws) writing `layout` ("peers" or "grouped")."""
        if layout not in LAYOUTS:
            raise CnmError(f"unknown Cut^nMix output layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        other = copy.copy(self)
        other.layout = layout
        return other

    def with_mix_prob(self, mix_prob: float) -> CutNMix:
        """The same op with another mixing probability; 0 gives the base views only, from the
        same draws (the same crops and flips as with mixing)."""
        check_config(self.peers, self.mode, self.alpha, mix_prob, self.pad)
        other = copy.copy(self)
        other.mix_prob = float(mix_prob)
        return other

    def draw(
        self,
        batch: int,
        device=None,
        generator: torch.Generator | None = None,
        height: int = 32,
        width: int = 32,
    ) -> CutNMixParams:
        """This batch's random parameters, drawn on `device` from `generator` (no host sync)."""
        return draw_params(
            batch,
            self.peers,
            height,
            width,
            mode=self.mode,
            alpha=self.alpha,
            mix_prob=self.mix_prob,
            pad=self.pad,
            flip=self.flip,
            device=device,
            generator=generator,
        )

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: CutNMixParams):
        """`cutnmix` with this object's mean/std/out_dtype/impl and the given params."""
        return cutnmix(
            images,
            labels,
            params,
            mean=self.mean,
            std=self.std,
            out_dtype=self.out_dtype,
            impl=self.impl,
            layout=self.layout,
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        b, h, w = check_images(images)
        params = self.draw(b, images.device, generator, h, w)
        return self.apply(images, labels, params)
