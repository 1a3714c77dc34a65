"""numba kernels of `pipeline.ops.numba_impl` (imported lazily: this module imports numba).

Kept at module level so that numba's on-disk cache (cache=True) can reuse the compiled code
across processes. See `pipeline.ops.numba_impl` for what they compute and why it is fast.
The mixup kernel works per output row and pixel (3 channels at once), with the per-sample
parameters hoisted and each source row resolved once (3x faster than per element); the box
kernel's row segments already did (the same restructuring measured slower there).
"""

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _segment(out, k, i, y, x0, x1, imgs, s, lut, oy, ox, fl, pad):
    # out[k,i,y,x0:x1] from the base view of sample s for peer k (pad, crop, then flip)
    h, w = imgs.shape[1], imgs.shape[2]
    sy = y + oy[k, s] - pad
    if sy < 0 or sy >= h:
        for x in range(x0, x1):
            for c in range(3):
                out[k, i, y, x, c] = lut[c, 0]
        return
    if fl[k, s]:
        for x in range(x0, x1):
            sx = (w - 1 - x) + ox[k, s] - pad
            if sx < 0 or sx >= w:
                for c in range(3):
                    out[k, i, y, x, c] = lut[c, 0]
            else:
                for c in range(3):
                    out[k, i, y, x, c] = lut[c, imgs[s, sy, sx, c]]
    else:
        for x in range(x0, x1):
            sx = x + ox[k, s] - pad
            if sx < 0 or sx >= w:
                for c in range(3):
                    out[k, i, y, x, c] = lut[c, 0]
            else:
                for c in range(3):
                    out[k, i, y, x, c] = lut[c, imgs[s, sy, sx, c]]


@njit(parallel=True, cache=True)
def box_kernel(imgs, lut, oy, ox, fl, perm, box_h, box_w, box_y, box_x, pad, out):
    P, B, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    for i in prange(B):
        j = perm[i]
        bh, bw = box_h[i], box_w[i]
        for k in range(P):
            by, bx = box_y[k, i], box_x[k, i]
            for y in range(H):
                if bh > 0 and bw > 0 and by <= y < by + bh:
                    _segment(out, k, i, y, 0, bx, imgs, i, lut, oy, ox, fl, pad)
                    _segment(out, k, i, y, bx, bx + bw, imgs, j, lut, oy, ox, fl, pad)
                    _segment(out, k, i, y, bx + bw, W, imgs, i, lut, oy, ox, fl, pad)
                else:
                    _segment(out, k, i, y, 0, W, imgs, i, lut, oy, ox, fl, pad)


@njit(inline="always")
def _row(dst, x0, x1, img, sy, ox, flip, pad, l0, l1, l2):
    # dst[x0:x1] ([W,3] row view) from the base view of image `img` ([H,W,3]) whose source row
    # is sy (pad, crop, then flip): zero padding is norm(0) = l*[0]
    h, w = img.shape[0], img.shape[1]
    if sy < 0 or sy >= h:
        for x in range(x0, x1):
            dst[x, 0] = l0[0]
            dst[x, 1] = l1[0]
            dst[x, 2] = l2[0]
        return
    src = img[sy]
    # source column of output column x: s0 + step*x, valid for x in [lo, hi)
    if flip:
        s0, step = (w - 1) + ox - pad, -1
        lo, hi = s0 - (w - 1), s0 + 1
    else:
        s0, step = ox - pad, 1
        lo, hi = -s0, w - s0
    lo = min(max(lo, x0), x1)
    hi = max(min(hi, x1), lo)
    for x in range(x0, lo):
        dst[x, 0] = l0[0]
        dst[x, 1] = l1[0]
        dst[x, 2] = l2[0]
    for x in range(lo, hi):
        sx = s0 + step * x
        dst[x, 0] = l0[src[sx, 0]]
        dst[x, 1] = l1[src[sx, 1]]
        dst[x, 2] = l2[src[sx, 2]]
    for x in range(hi, x1):
        dst[x, 0] = l0[0]
        dst[x, 1] = l1[0]
        dst[x, 2] = l2[0]


@njit(parallel=True, cache=True)
def blend_kernel(imgs, lut32, oy, ox, fl, perm, lam, pad, out, bf16):
    # out float32, or (bf16=True) int16 holding bfloat16 bits rounded to nearest even, as torch
    P, B, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    one = np.float32(1.0)
    l0, l1, l2 = lut32[0], lut32[1], lut32[2]
    for i in prange(B):
        j = perm[i]
        la = lam[i]
        lb = one - la
        own, par = imgs[i], imgs[j]
        a = np.empty((W, 3), dtype=np.float32)
        b = np.empty((W, 3), dtype=np.float32)
        r = np.empty((W, 3), dtype=np.float32)
        bits = r.view(np.uint32)
        for k in range(P):
            oyi, oxi, fli = oy[k, i] - pad, ox[k, i], fl[k, i]
            oyj, oxj, flj = oy[k, j] - pad, ox[k, j], fl[k, j]
            view = out[k, i]
            for y in range(H):
                _row(a, 0, W, own, y + oyi, oxi, fli, pad, l0, l1, l2)
                _row(b, 0, W, par, y + oyj, oxj, flj, pad, l0, l1, l2)
                row = view[y]
                for x in range(W):
                    r[x, 0] = la * a[x, 0] + lb * b[x, 0]
                    r[x, 1] = la * a[x, 1] + lb * b[x, 1]
                    r[x, 2] = la * a[x, 2] + lb * b[x, 2]
                if bf16:
                    for x in range(W):
                        for c in range(3):
                            u = np.int64(bits[x, c])
                            row[x, c] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                else:
                    for x in range(W):
                        row[x, 0] = r[x, 0]
                        row[x, 1] = r[x, 1]
                        row[x, 2] = r[x, 2]
