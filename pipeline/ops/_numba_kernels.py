"""numba kernels of `pipeline.ops.numba_impl` (imported lazily: this module imports numba).

Kept at module level so that numba's on-disk cache (cache=True) can reuse the compiled code
across processes. See `pipeline.ops.numba_impl` for what they compute and why it is fast.
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
def _base_pixel(imgs, s, y, x, oy, ox, flip, pad, c):
    h, w = imgs.shape[1], imgs.shape[2]
    sy = y + oy - pad
    xs = w - 1 - x if flip else x
    sx = xs + ox - pad
    if 0 <= sy < h and 0 <= sx < w:
        return imgs[s, sy, sx, c]
    return 0


@njit(parallel=True, cache=True)
def blend_kernel(imgs, lut32, oy, ox, fl, perm, lam, pad, out):
    P, B, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    one = np.float32(1.0)
    for i in prange(B):
        j = perm[i]
        la = lam[i]
        lb = one - la
        for k in range(P):
            for y in range(H):
                for x in range(W):
                    for c in range(3):
                        a = lut32[c, _base_pixel(imgs, i, y, x, oy[k, i], ox[k, i], fl[k, i], pad, c)]
                        b = lut32[c, _base_pixel(imgs, j, y, x, oy[k, j], ox[k, j], fl[k, j], pad, c)]
                        out[k, i, y, x, c] = la * a + lb * b
