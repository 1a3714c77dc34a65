"""Fused Triton Cut^nMix: one launch turns a uint8 batch into all P normalised peer views.

Same semantics as `pipeline.ops.reference` (docs/design.md#cutnmix-views; Shen et al., arXiv
2206.12370 as formulated by this project). Runs on CUDA tensors, and on CPU tensors under
`TRITON_INTERPRET=1`. Import it only through `pipeline.ops.cutnmix` (impl="triton"/"auto"),
which checks that triton is installed first. Offline evidence (registers, SASS instructions per
output element, store widths): `python -m bench.kernel_stats`.

One program per sample, one thread per run of PPT (16 at 32x32) pixels of a row. The program
reads its image (and its partner's, when mixed) once with 8-byte loads and stages the pixels (one
uint32 each) in shared memory (`tl.gather`), every row followed by a block of zeros, so that the
crop's zero padding is a plain read: per output pixel and peer the gather index is one add (plus a
select for the box), every per-sample parameter is loaded once, all peers share one gather.
It then normalises the 3 channels and writes each thread's contiguous outputs with 16-byte
stores. No division, no bounds check per pixel. layout="grouped" writes [B,H,W,P,3]
(= [B,P*3,H,W] channels-last) the same way. Measured: docs/performance.md#the-kernel-offline.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from pipeline.ops.params import BOX_MODES, CutNMixParams


@triton.jit
def _tree(vals, lo: tl.constexpr, stride: tl.constexpr, n: tl.constexpr):
    # join vals[lo], vals[lo+stride], ... (n of them, n a power of two) into [..., 2, .., 2]
    # such that a row-major reshape lists them in order (the inner joins pair distant slots)
    if n == 1:
        return vals[lo]
    else:
        return tl.join(_tree(vals, lo, stride * 2, n // 2), _tree(vals, lo + stride, stride * 2, n // 2))


@triton.jit
def _flat(vals, lo: tl.constexpr, n: tl.constexpr, T: tl.constexpr):
    # [T] tensors vals[lo:lo+n] -> [T*n], element t*n + m = vals[lo+m][t] (register relabelling)
    if n == 1:
        return vals[lo]
    else:
        return tl.reshape(_tree(vals, lo, 1, n), (T * n,))


@triton.jit
def _unflat(x, n: tl.constexpr):
    # inverse of _flat on a [T, 2, ..., 2] tensor: the tuple of its n slots in order
    if n == 1:
        return (x,)
    else:
        a, b = tl.split(x)
        ea = _unflat(a, n // 2)
        eb = _unflat(b, n // 2)
        out = ()
        for m in tl.static_range(n):
            if m % 2 == 0:
                out = out + (ea[m // 2],)
            else:
                out = out + (eb[m // 2],)
        return out


@triton.jit
def _split_shape(x, T: tl.constexpr, n: tl.constexpr):
    # [T*n] -> [T, 2, ..., 2] (log2(n) twos, n <= 128), ready for _unflat
    if n == 1:
        return x
    elif n == 2:
        return tl.reshape(x, (T, 2))
    elif n == 4:
        return tl.reshape(x, (T, 2, 2))
    elif n == 8:
        return tl.reshape(x, (T, 2, 2, 2))
    elif n == 16:
        return tl.reshape(x, (T, 2, 2, 2, 2))
    elif n == 32:
        return tl.reshape(x, (T, 2, 2, 2, 2, 2))
    elif n == 64:
        return tl.reshape(x, (T, 2, 2, 2, 2, 2, 2))
    else:
        return tl.reshape(x, (T, 2, 2, 2, 2, 2, 2, 2))


@triton.jit
def _pixel_words(img_ptr, s, pix, live, MASKED: tl.constexpr, N: tl.constexpr, PPT: tl.constexpr,
                 WIDE_LOADS: tl.constexpr):
    # image s's pixels pix .. pix+PPT-1 ([T] int32 flat pixel index of each thread's run): tuple
    # of PPT [T] uint32, channel c in byte c (byte 3 is junk: only bytes 0..2 are ever read);
    # masked-off threads read 0
    base = img_ptr + s.to(tl.int64) * N
    px = ()
    if WIDE_LOADS:  # PPT >= 8: 3*PPT bytes per thread as aligned 8-byte loads
        wp = base.to(tl.pointer_type(tl.uint64)) + (pix // 8) * 3
        words = ()
        for m in tl.static_range(3 * PPT // 8):
            if MASKED:
                w = tl.load(wp + m, mask=live, other=0)
            else:
                w = tl.load(wp + m)
            words = words + (w.to(tl.uint32), (w >> 32).to(tl.uint32))
        for q in tl.static_range(PPT):  # pixel q = bits 24q .. 24q+23: at most one funnel shift
            if (24 * q) % 32 == 0:
                px = px + (words[(24 * q) // 32],)
            elif (24 * q) % 32 <= 8:
                px = px + (words[(24 * q) // 32] >> ((24 * q) % 32),)
            else:
                px = px + ((words[(24 * q) // 32] >> ((24 * q) % 32)) |
                           (words[(24 * q) // 32 + 1] << (32 - (24 * q) % 32)),)
    else:
        for q in tl.static_range(PPT):
            v = ()
            for c in tl.static_range(3):
                if MASKED:
                    v = v + (tl.load(base + 3 * pix + 3 * q + c, mask=live, other=0).to(tl.uint32),)
                else:
                    v = v + (tl.load(base + 3 * pix + 3 * q + c).to(tl.uint32),)
            px = px + (v[0] | (v[1] << 8) | (v[2] << 16),)
    return px


@triton.jit
def _staged(img_ptr, s, pix, live, MASKED: tl.constexpr, N: tl.constexpr, PPT: tl.constexpr, T: tl.constexpr,
            HP: tl.constexpr, WP: tl.constexpr, WIDE_LOADS: tl.constexpr):
    # image s as [HP*2*WP] uint32 (channel c in byte c): row y's pixel x at y*2*WP + x, zeros
    # at columns W..2*WP-1 (the crop's padding: no bounds check per pixel)
    px = _pixel_words(img_ptr, s, pix, live, MASKED, N, PPT, WIDE_LOADS)
    rows = tl.reshape(_flat(px, 0, PPT, T), (HP, WP))
    return tl.reshape(tl.permute(tl.join(rows, tl.zeros_like(rows)), (0, 2, 1)), (HP * 2 * WP,))


@triton.jit
def _norm_px(px, c: tl.constexpr, mean0, mean1, mean2, inv0, inv1, inv2):
    # channel c of packed pixels, normalised in float32
    v = ((px >> (8 * c)) & 255).to(tl.float32)
    if c == 0:
        return (v - mean0) * inv0
    elif c == 1:
        return (v - mean1) * inv1
    else:
        return (v - mean2) * inv2


@triton.jit
def _gather(src, idx, lo: tl.constexpr, n: tl.constexpr, T: tl.constexpr):
    # src at the n [T] index tensors idx[lo:lo+n] (n a power of two): tuple of n [T] values; one
    # gather (one staging of src in shared memory) per 128 of them
    if n > 128:
        return _gather(src, idx, lo, n // 2, T) + _gather(src, idx, lo + n // 2, n // 2, T)
    else:
        return _unflat(_split_shape(tl.gather(src, _flat(idx, lo, n, T), 0), T, n), n)


@triton.jit
def _columns(y, x0, oy, ox, fl, pad, H: tl.constexpr, W: tl.constexpr, PPT: tl.constexpr, WP: tl.constexpr):
    # base view (pad, crop, flip) of one source for a thread's pixels (y, x0+q), q < PPT, in the
    # staged layout of _staged: (c, d) with staged index c + d*q (a zero where the pixel is padding)
    sy = y + oy - pad
    d = tl.where(fl, -1, 1)
    a = tl.where(fl, (W - 1) - x0, x0) + ox - pad  # source column of q = 0
    lo = tl.where(fl, a - (PPT - 1), a)
    # a run partly in the image stays within [-(PPT-1), W+PPT-1): the zero columns (and, on row
    # 0, the wrap to the last row's) cover it; a run wholly in the padding reads one zero slot
    ok = (sy.to(tl.uint32, bitcast=True) < H) & (lo > -PPT) & (lo < W)
    return tl.where(ok, sy * (2 * WP) + a, WP), tl.where(ok, d, 0)


@triton.jit
def _cutnmix_kernel(
    img_ptr,  # uint8 [B,H,W,3] contiguous
    out_ptr,  # out dtype [P,B,H,W,3] (peers layout) or [B,H,W,P,3] (grouped layout), contiguous
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
    PG: tl.constexpr,  # next power of two >= P
    H: tl.constexpr,
    W: tl.constexpr,
    PPT: tl.constexpr,  # pixels per thread: a power of two dividing W (16 at 32x32)
    HP: tl.constexpr,  # next power of two >= H
    WP: tl.constexpr,  # next power of two >= W
    BOX: tl.constexpr,
    BLEND: tl.constexpr,
    GROUPED: tl.constexpr,  # write [B,H,W,P,3] (the grouped network's channels-last input)
    WIDE_LOADS: tl.constexpr,  # PPT >= 8 (every thread's 3*PPT source bytes are 8-byte aligned)
):
    N: tl.constexpr = H * W * 3
    RP: tl.constexpr = WP // PPT  # runs per (padded) row
    T: tl.constexpr = HP * RP  # runs: thread t covers row t // RP, columns x0 .. x0+PPT-1
    TWO: tl.constexpr = BOX or BLEND
    SIZE: tl.constexpr = HP * 2 * WP * (2 if TWO else 1)  # staged slots
    FULL: tl.constexpr = HP == H and WP == W  # no idle thread
    i = tl.program_id(0)  # this program's sample
    j = tl.load(perm_ptr + i).to(tl.int32)  # its partner
    t = tl.arange(0, T)
    y = t // RP  # shifts and masks: RP, PPT are powers of two
    x0 = (t % RP) * PPT
    pix = y * W + x0  # flat pixel of the run's first output
    if FULL:
        live = t >= 0
    else:
        live = (y < H) & (x0 < W)
    odt = out_ptr.dtype.element_ty
    SV: tl.constexpr = 128 // odt.primitive_bitwidth  # outputs per 16-byte store
    if BOX:
        bh = tl.load(bh_ptr + i).to(tl.int32)
        bw = tl.load(bw_ptr + i).to(tl.int32)
        need_par = (bh > 0) & (bw > 0)
    # the gather moves raw pixels (one uint32 each), normalised after it: staging normalised
    # float32 values costs 3 words per pixel and the normalisation of pixels no view reads
    src = _staged(img_ptr, i, pix, live, not FULL, N, PPT, T, HP, WP, WIDE_LOADS)
    if TWO:
        if BOX:  # an empty box needs no partner pixel
            live_j = tl.where(need_par, live, t < 0)
        else:
            live_j = live
        src = tl.reshape(tl.join(src, _staged(img_ptr, j, pix, live_j, BOX or not FULL, N, PPT, T, HP, WP,
                                              WIDE_LOADS)), (SIZE,))
    if BLEND:
        lam_a = tl.load(lam_ptr + i)
        lam_b = 1.0 - lam_a
    else:
        lam_a = 1.0
        lam_b = 0.0
    # per-sample parameter pointers; peer k's value is k*B further
    oy_i = oy_ptr + i
    ox_i = ox_ptr + i
    fl_i = flip_ptr + i
    oy_j = oy_ptr + j
    ox_j = ox_ptr + j
    fl_j = flip_ptr + j
    by_i = by_ptr + i
    bx_i = bx_ptr + i
    # every peer's gather indices first, then one gather: src is staged in shared memory once
    idx = ()
    for k in tl.static_range(P):
        kb = k * B
        c_i, e_i = _columns(y, x0, tl.load(oy_i + kb).to(tl.int32), tl.load(ox_i + kb).to(tl.int32),
                            tl.load(fl_i + kb) != 0, pad, H, W, PPT, WP)
        if TWO:
            c_j, e_j = _columns(y, x0, tl.load(oy_j + kb).to(tl.int32), tl.load(ox_j + kb).to(tl.int32),
                                tl.load(fl_j + kb) != 0, pad, H, W, PPT, WP)
            # own pixel f at slot 2f, the partner's at 2f+1
            c_i = 2 * c_i
            e_i = 2 * e_i
            c_j = 2 * c_j + 1
            e_j = 2 * e_j
        if BOX:
            by = tl.load(by_i + kb).to(tl.int32)
            bx = tl.load(bx_i + kb).to(tl.int32)
            bw_row = tl.where((y >= by) & (y < by + bh), bw, 0).to(tl.uint32, bitcast=True)  # on this row
            xb = x0 - bx
        for q in tl.static_range(PPT):
            ix = c_i + e_i * q
            if BOX:
                inb = (xb + q).to(tl.uint32, bitcast=True) < bw_row
                ix = tl.where(inb, c_j + e_j * q, ix)
            if BLEND:
                idx = idx + (ix & (SIZE - 1), (c_j + e_j * q) & (SIZE - 1))
            else:
                idx = idx + (ix & (SIZE - 1),)
    M: tl.constexpr = 2 if BLEND else 1  # gathered pixels per output pixel
    for _ in tl.static_range((PG - P) * PPT * M):  # pad to a power of two (dead slots)
        idx = idx + (tl.zeros_like(y),)
    g = _gather(src, idx, 0, PG * PPT * M, T)
    if GROUPED:
        # [B,H,W,P,3]: the thread's PPT pixels x P peers x 3 channels are contiguous: computed in
        # that order, each 16-byte run stored as soon as it is complete (few values live)
        n: tl.constexpr = 3 * P * PPT
        R: tl.constexpr = _run(n, SV)
        dst = out_ptr + i.to(tl.int64) * (N * P) + 3 * P * pix
        vals = ()
        for e in tl.static_range(n):  # e = (q*P + k)*3 + c
            vals = vals + (_view_value(g, ((e // 3) % P) * PPT + e // (3 * P), e % 3, M, BLEND, lam_a, lam_b,
                                       mean0, mean1, mean2, inv0, inv1, inv2).to(odt),)
            if (e + 1) % R == 0:
                _store_slice(dst, vals, e + 1 - R, R, live, FULL, T)
    else:
        for k in tl.static_range(P):
            # this thread's 3*PPT contiguous outputs of view k (16-byte runs)
            vals = ()
            for e in tl.static_range(3 * PPT):  # e = q*3 + c
                vals = vals + (_view_value(g, k * PPT + e // 3, e % 3, M, BLEND, lam_a, lam_b,
                                           mean0, mean1, mean2, inv0, inv1, inv2).to(odt),)
            _store_runs(out_ptr + (k * B + i).to(tl.int64) * N + 3 * pix, vals, 3 * PPT, live, FULL, T, SV)


@triton.jit
def _view_value(g, s: tl.constexpr, c: tl.constexpr, M: tl.constexpr, BLEND: tl.constexpr, lam_a, lam_b,
                mean0, mean1, mean2, inv0, inv1, inv2):
    # float32 channel c of gathered pixel slot s (peer k, pixel q: s = k*PPT + q)
    v = _norm_px(g[s * M], c, mean0, mean1, mean2, inv0, inv1, inv2)
    if BLEND:  # mixup: blend normalised float32 values, round once
        v = lam_a * v + lam_b * _norm_px(g[s * M + 1], c, mean0, mean1, mean2, inv0, inv1, inv2)
    return v


@triton.jit
def _run(n: tl.constexpr, SV: tl.constexpr):
    # values per vector store for n contiguous values per thread: SV (16 bytes) when it divides n
    if n % SV == 0:
        return SV
    elif n % (SV // 2) == 0:
        return SV // 2
    else:
        return 1


@triton.jit
def _store_slice(dst, vals, lo: tl.constexpr, R: tl.constexpr, live, FULL: tl.constexpr, T: tl.constexpr):
    # vals[lo:lo+R] (R [T] tensors) at dst+lo .. dst+lo+R-1 ([T] pointers): one R-wide store
    if R > 1:
        ptrs = tl.reshape(dst[:, None] + (lo + tl.arange(0, R))[None, :], (T * R,))
    else:
        ptrs = dst + lo
    if FULL:
        tl.store(ptrs, _flat(vals, lo, R, T))
    else:
        tl.store(ptrs, _flat(vals, lo, R, T), mask=_flat_mask(live, R, T))


@triton.jit
def _store_runs(dst, vals, n: tl.constexpr, live, FULL: tl.constexpr, T: tl.constexpr, SV: tl.constexpr):
    # write each thread's n contiguous values (tuple of n [T] tensors) at dst ([T] pointers)
    R: tl.constexpr = _run(n, SV)
    for r in tl.static_range(n // R):
        _store_slice(dst, vals, r * R, R, live, FULL, T)


@triton.jit
def _flat_mask(live, PPT: tl.constexpr, T: tl.constexpr):
    if PPT == 1:
        return live
    else:
        return tl.reshape(tl.broadcast_to(live[:, None], (T, PPT)), (T * PPT,))


def pixels_per_thread(width: int) -> int:
    """The kernel's run of pixels per thread: the largest power of two <= 16 dividing W."""
    return math.gcd(int(width), 16)


def launch_config(height: int, width: int) -> dict:
    """Shape-derived constexprs and warps of the kernel for H x W images."""
    ppt = pixels_per_thread(width)
    hp, wp = triton.next_power_of_2(height), triton.next_power_of_2(width)
    runs = hp * wp // ppt
    return {"PPT": ppt, "HP": hp, "WP": wp, "WIDE_LOADS": ppt >= 8, "num_warps": max(1, min(8, runs // 32))}


def compile_options(box: bool) -> dict:
    """Compile options of the kernel: the box modes capped at 64 registers (ptxas otherwise keeps
    up to 78 there, for no fewer instructions and no spill at 64); the others need no cap (32-46)."""
    return {"maxnreg": 64} if box else {}


def triton_cutnmix_views(
    images: torch.Tensor,
    params: CutNMixParams,
    mean32: np.ndarray,
    inv_std32: np.ndarray,
    out_dtype: torch.dtype,
    layout: str = "peers",
) -> torch.Tensor:
    """images uint8 [B,H,W,3] -> views [P,B,3,H,W] out_dtype (each views[k] channels-last), or
    with layout="grouped" [B,P*3,H,W] channels-last (peer k's channels at 3k:3k+3, the input of
    the grouped network: `trainer.peers.views_to_grouped_input(views)` without the copy).

    One kernel launch, grid (B,); no host synchronisation; 64-bit base offsets.
    """
    b, h, w, _ = images.shape
    P = params.peers
    grouped = layout == "grouped"
    shape = (b, h, w, P, 3) if grouped else (P, b, h, w, 3)
    out = torch.empty(shape, dtype=out_dtype, device=images.device)
    m = [float(v) for v in mean32]  # float32 values, exactly representable: passed as fp32
    s = [float(v) for v in inv_std32]
    images = images.contiguous()
    cfg = launch_config(h, w)
    cfg["WIDE_LOADS"] = cfg["WIDE_LOADS"] and images.data_ptr() % 8 == 0  # a view may start anywhere
    _cutnmix_kernel[(b,)](
        images,
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
        PG=triton.next_power_of_2(P),
        H=h,
        W=w,
        BOX=params.mode in BOX_MODES,
        BLEND=params.mode == "mixup",
        GROUPED=grouped,
        enable_fp_fusion=False,  # no FMA: the mixup blend must round like torch
        **cfg,
        **compile_options(params.mode in BOX_MODES),
    )
    if grouped:
        return out.view(b, h, w, P * 3).permute(0, 3, 1, 2)
    return out.permute(0, 1, 4, 2, 3)
