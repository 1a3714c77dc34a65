"""Fused Triton Cut^nMix: one launch turns a uint8 batch into all P normalised peer views.

Same semantics as `pipeline.ops.reference` (DESIGN.md, section Cut^nMix; Shen et al.,
arXiv 2206.12370 as formulated by this project). Runs on CUDA tensors, and on CPU tensors under
`TRITON_INTERPRET=1` (how the tests exercise it without a GPU). This module imports triton at
the top: import it only through `pipeline.ops.cutnmix` (impl="triton"/"auto"), which checks that
triton is installed first.

Why it is fast (the op is memory-bound: per sample it must read 3 KB of uint8 and write
P*H*W*3 output values, 18 KB for P=3 in bf16, so the goal is to move exactly those bytes once):
- One program per sample, looping over all P peers: the sample's 3 KB source image is fetched
  from HBM once and served from L1/L2 to every peer's crop; the partner's box pixels are the
  only other reads. No intermediate (padded, cropped, flipped, pasted, float) tensor is ever
  written: pad, crop, flip, box paste, normalise and cast all happen in registers.
- The program walks its sample's [H,W,3] output, for each peer, in contiguous chunks of BLOCK
  elements, so every store is a fully coalesced, vectorisable (16 B per thread) write of
  channels-last data; H, W are compile-time constants so the row/column/channel of each element
  is a multiply-shift, and the output offset's divisibility is known to the compiler.
- Row/column/channel and the per-channel constants are computed once per chunk and reused for
  the P peers; all per-(peer, sample) parameters are a handful of scalar loads.
- The zero padding is a masked load (`other=0`), never materialised.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from pipeline.ops.params import BOX_MODES, CutNMixParams

BLOCK = 1024  # elements per chunk (8 per thread with 4 warps)


@triton.jit
def _cutnmix_kernel(
    img_ptr,  # uint8 [B,H,W,3] contiguous
    out_ptr,  # out dtype [P,B,H,W,3] contiguous
    oy_ptr,
    ox_ptr,
    flip_ptr,  # int64, int64, bool [P,B]
    perm_ptr,  # int64 [B]
    bh_ptr,
    bw_ptr,  # int64 [B]
    by_ptr,
    bx_ptr,  # int64 [P,B]
    lam_ptr,  # float32 [B]
    B,
    pad,
    mean0,
    mean1,
    mean2,
    inv0,
    inv1,
    inv2,  # float32 normalisation constants
    P: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    N: tl.constexpr,  # N = H*W*3
    BLOCK: tl.constexpr,
    BOX: tl.constexpr,
    BLEND: tl.constexpr,
    WIDE: tl.constexpr,  # 64-bit offsets (only for batches of more than 2**31 output values)
):
    i = tl.program_id(0)  # this program's sample
    if WIDE:
        i = i.to(tl.int64)
    ity = i.dtype
    j = tl.load(perm_ptr + i).to(ity)  # its partner
    if BOX:
        bh = tl.load(bh_ptr + i).to(tl.int32)
        bw = tl.load(bw_ptr + i).to(tl.int32)
    if BLEND:
        lam_a = tl.load(lam_ptr + i)
        lam_b = 1.0 - lam_a
    for t in tl.static_range(0, (N + BLOCK - 1) // BLOCK):
        # flat (y, x, c) index inside one [H,W,3] view: H, W constexpr, so // and % are
        # multiply-shifts; computed once per chunk and shared by the P peers
        e = t * BLOCK + tl.arange(0, BLOCK)
        live = e < N
        y = e // (W * 3)
        x = (e // 3) % W
        c = e % 3
        mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))
        inv = tl.where(c == 0, inv0, tl.where(c == 1, inv1, inv2))
        xf = (W - 1) - x  # column of the flipped crop
        for k in tl.static_range(P):
            kb = k * B
            oy_i = tl.load(oy_ptr + kb + i).to(tl.int32)
            ox_i = tl.load(ox_ptr + kb + i).to(tl.int32)
            fl_i = tl.load(flip_ptr + kb + i) != 0
            oy_j = tl.load(oy_ptr + kb + j).to(tl.int32)
            ox_j = tl.load(ox_ptr + kb + j).to(tl.int32)
            fl_j = tl.load(flip_ptr + kb + j) != 0
            if BLEND:
                # own and partner base views, blended in float32 after normalising
                sy = y + oy_i - pad
                sx = tl.where(fl_i, xf, x) + ox_i - pad
                ok = live & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
                pa = tl.load(img_ptr + i * N + ((sy * W + sx) * 3 + c), mask=ok, other=0)
                sy = y + oy_j - pad
                sx = tl.where(fl_j, xf, x) + ox_j - pad
                ok = live & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
                pb = tl.load(img_ptr + j * N + ((sy * W + sx) * 3 + c), mask=ok, other=0)
                na = (pa.to(tl.float32) - mean) * inv
                nb = (pb.to(tl.float32) - mean) * inv
                v = lam_a * na + lam_b * nb
            else:
                if BOX:
                    by = tl.load(by_ptr + kb + i).to(tl.int32)
                    bx = tl.load(bx_ptr + kb + i).to(tl.int32)
                    inb = (y >= by) & (y < by + bh) & (x >= bx) & (x < bx + bw)
                    s = tl.where(inb, j, i)  # whose base view this pixel shows
                    oy = tl.where(inb, oy_j, oy_i)
                    ox = tl.where(inb, ox_j, ox_i)
                    fl = tl.where(inb, fl_j, fl_i)
                else:
                    s = i
                    oy = oy_i
                    ox = ox_i
                    fl = fl_i
                sy = y + oy - pad  # pad, crop, then flip (crop coordinates mirrored)
                sx = tl.where(fl, xf, x) + ox - pad
                ok = live & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)  # else zero padding
                p = tl.load(img_ptr + s * N + ((sy * W + sx) * 3 + c), mask=ok, other=0)
                v = (p.to(tl.float32) - mean) * inv
            # contiguous, 16-byte aligned run of BLOCK outputs: coalesced vector stores
            tl.store(out_ptr + (kb + i) * N + e, v.to(out_ptr.dtype.element_ty), mask=live)


def triton_cutnmix_views(
    images: torch.Tensor,
    params: CutNMixParams,
    mean32: np.ndarray,
    inv_std32: np.ndarray,
    out_dtype: torch.dtype,
    wide: bool | None = None,
) -> torch.Tensor:
    """images uint8 [B,H,W,3] -> views [P,B,3,H,W] out_dtype (each views[k] channels-last).

    One kernel launch, grid (B,); no host synchronisation. Offsets are 32-bit unless the output
    has 2**31 values or more (`wide`=True forces the 64-bit variant, for tests).
    """
    b, h, w, _ = images.shape
    P = params.peers
    out = torch.empty((P, b, h, w, 3), dtype=out_dtype, device=images.device)
    m = [float(v) for v in mean32]  # float32 values, exactly representable: passed as fp32
    s = [float(v) for v in inv_std32]
    n = h * w * 3
    _cutnmix_kernel[(b,)](
        images.contiguous(),
        out,
        # the params are tiny and already contiguous: pass them as they are (no extra kernels)
        params.offset_y.contiguous(),
        params.offset_x.contiguous(),
        params.flip.contiguous(),
        params.perm,
        params.box_h,
        params.box_w,
        params.box_y.contiguous(),
        params.box_x.contiguous(),
        params.lam,
        b,
        params.pad,
        m[0],
        m[1],
        m[2],
        s[0],
        s[1],
        s[2],
        P=P,
        H=h,
        W=w,
        N=n,
        BLOCK=BLOCK,
        BOX=params.mode in BOX_MODES,
        BLEND=params.mode == "mixup",
        WIDE=bool(wide) if wide is not None else out.numel() >= 2**31 - BLOCK,
        num_warps=4,
        enable_fp_fusion=False,  # no FMA: the mixup blend must round like torch
    )
    return out.permute(0, 1, 4, 2, 3)
