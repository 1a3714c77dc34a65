"""The reference Cut^nMix: per-pixel, obviously correct Python. The oracle of every test.

Implements the semantics written out in `pipeline.ops.params` (docs/design.md#cutnmix-views;
Shen et al., arXiv 2206.12370, as formulated by this project) one output pixel at a time:
for peer k, sample i, row y, column x

    in_box = mode is a box mode and box_y[k,i] <= y < box_y[k,i]+box_h[i]
             and box_x[k,i] <= x < box_x[k,i]+box_w[i]
    s      = perm[i] if in_box else i                      (whose view the pixel comes from)
    pixel  = base_pixel(s, k, y, x)                        (pad, crop, then flip)
    view   = norm(pixel)                                   (box modes and none)
    view   = lam[i]*norm(base_pixel(i,k,y,x)) + (1-lam[i])*norm(base_pixel(perm[i],k,y,x))  (mixup)

It is slow (pure Python loops over every pixel); use it on small batches only.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.ops.params import BOX_MODES, CutNMixParams, check_param_values, norm_constants


def base_pixel(imgs: np.ndarray, s: int, y: int, x: int, oy: int, ox: int, flip: bool, pad: int):
    """The 3 uint8 values of base view (pad, crop at (oy, ox), then flip) of image s at (y, x)."""
    _, h, w, _ = imgs.shape
    xs = w - 1 - x if flip else x  # the flip acts on the crop, so it mirrors crop coordinates
    sy, sx = y + oy - pad, xs + ox - pad  # padded-image coordinates -> image coordinates
    if 0 <= sy < h and 0 <= sx < w:
        return [int(v) for v in imgs[s, sy, sx]]
    return [0, 0, 0]  # zero padding


def reference_cutnmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    params: CutNMixParams,
    *,
    mean,
    std,
    out_dtype: torch.dtype = torch.float32,
):
    """images uint8 [B,H,W,3], labels int [B] -> (views [P,B,3,H,W] out_dtype, y_a, y_b, lam).

    Output on images.device; each views[k] channels-last; y_b = labels[perm]; lam = params.lam.
    """
    device = images.device
    imgs = images.detach().cpu().numpy()
    b, h, w, _ = imgs.shape
    check_param_values(params, h, w)
    d = params.numpy()
    P = params.peers
    mean32, inv_std32 = norm_constants(mean, std)

    def norm(pix):  # float32 (p - mean32) * inv_std32, channel by channel
        return [np.float32(np.float32(pix[c]) - mean32[c]) * inv_std32[c] for c in range(3)]

    out = np.zeros((P, b, h, w, 3), dtype=np.float32)
    for k in range(P):
        for i in range(b):
            j = int(d["perm"][i])
            bh, bw = int(d["box_h"][i]), int(d["box_w"][i])
            by, bx = int(d["box_y"][k, i]), int(d["box_x"][k, i])
            lam = np.float32(d["lam"][i])
            for y in range(h):
                for x in range(w):
                    own = base_pixel(
                        imgs, i, y, x, d["offset_y"][k, i], d["offset_x"][k, i], d["flip"][k, i], params.pad
                    )
                    other = base_pixel(
                        imgs, j, y, x, d["offset_y"][k, j], d["offset_x"][k, j], d["flip"][k, j], params.pad
                    )
                    if params.mode in BOX_MODES:
                        in_box = by <= y < by + bh and bx <= x < bx + bw
                        val = norm(other if in_box else own)
                    elif params.mode == "mixup":
                        na, nb = norm(own), norm(other)
                        val = [
                            np.float32(lam * na[c]) + np.float32((np.float32(1) - lam) * nb[c])
                            for c in range(3)
                        ]
                    else:
                        val = norm(own)
                    out[k, i, y, x] = val
    views = torch.from_numpy(out).to(out_dtype).permute(0, 1, 4, 2, 3).to(device)
    y_a = labels.to(device=device, dtype=torch.int64)
    return views, y_a, y_a[params.perm.to(device)], params.lam.to(device)
