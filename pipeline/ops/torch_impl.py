"""Vectorised torch Cut^nMix: no Python loop over samples; the GPU fallback and CPU path.

Same semantics as `pipeline.ops.reference` (docs/design.md#cutnmix-views; Shen et al.,
arXiv 2206.12370 as formulated by this project), computed as ONE gather:

1. Zero-pad the small uint8 source and normalise it once through a [3,256] lookup table
   (B*Hp*Wp*3 values, ~P times fewer than the output): `src` [B*Hp*Wp, 3] in the output dtype
   (float32 for mixup). Normalising before the gather gives bit-identical results (the gather
   only moves values).
2. Build the flat source-pixel index of every output pixel from small 1-D tensors: per
   (peer, sample, row) a row base `(s*Hp + y + offset_y[k,s]) * Wp` and per (peer, sample,
   column) a column `x' + offset_x[k,s]` (x' = W-1-x when flipped), for s = the sample itself
   and s = its partner; the box picks which of the two per pixel (int32 arithmetic).
3. `index_select` whole 3-channel pixels into the [P,B,H,W,3] output (channels-last views).

No host synchronisation (no host-to-device copies, no data-dependent shapes), so it runs
unchanged on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.ops.params import BOX_MODES, CutNMixParams


def normalised_padded_source(
    images: torch.Tensor, pad: int, mean32: np.ndarray, inv_std32: np.ndarray, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 [B,H,W,3] -> dtype [B*(H+2pad)*(W+2pad), 3]: norm(pixels), padding = norm(0).

    Zero-pads in uint8, then looks every value up in a [3*256] table of norm(p) already in
    `dtype` (three cheap passes instead of a chain of float ops; the values are the same).
    """
    dev = images.device
    # built from Python scalars on the device: no host-to-device copy, so no synchronisation
    p = torch.arange(256, dtype=torch.float32, device=dev)
    table = torch.cat([((p - float(mean32[c])) * float(inv_std32[c])).to(dtype) for c in range(3)])
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad)) if pad else images
    channel_base = torch.arange(0, 768, 256, dtype=torch.int32, device=dev)  # table row of channel c
    index = (padded.reshape(-1, 3) + channel_base).view(-1)  # uint8 + int32 -> int32
    return table.index_select(0, index).view(-1, 3)


def source_index(params: CutNMixParams, height: int, width: int, which: str) -> torch.Tensor:
    """int32 [P,B,H,W]: flat index into the padded source of each output pixel.

    which = "own" (every pixel from the sample's own base view), "partner" (from the partner's
    base view of the same peer) or "box" (partner inside the peer's box, own elsewhere).
    """
    pad, dev = params.pad, params.device
    hp, wp = height + 2 * pad, width + 2 * pad
    P, B = params.peers, params.batch
    i32 = torch.int32
    ys = torch.arange(height, device=dev, dtype=i32)
    xs = torch.arange(width, device=dev, dtype=i32)
    xs_flipped = (width - 1) - xs

    def rows_cols(s: torch.Tensor):  # s int64 [P,B]: whose base view (per peer, per output sample)
        oy = params.offset_y.gather(1, s).to(i32)
        ox = params.offset_x.gather(1, s).to(i32)
        fl = params.flip.gather(1, s)
        row = (s.to(i32)[..., None] * hp + oy[..., None] + ys) * wp  # [P,B,H]
        col = torch.where(fl[..., None], xs_flipped, xs) + ox[..., None]  # [P,B,W]
        return row, col

    own = torch.arange(B, device=dev).expand(P, B)
    partner = params.perm.expand(P, B)
    if which == "own":
        r, c = rows_cols(own)
        return r[..., None] + c[..., None, :]
    if which == "partner":
        r, c = rows_cols(partner)
        return r[..., None] + c[..., None, :]
    r_own, c_own = rows_cols(own)
    r_par, c_par = rows_cols(partner)
    by, bx = params.box_y.to(i32), params.box_x.to(i32)
    bh, bw = params.box_h.to(i32), params.box_w.to(i32)
    row_in = (ys >= by[..., None]) & (ys < (by + bh)[..., None])  # [P,B,H]
    col_in = (xs >= bx[..., None]) & (xs < (bx + bw)[..., None])  # [P,B,W]
    in_box = row_in[..., None] & col_in[..., None, :]
    return torch.where(in_box, r_par[..., None] + c_par[..., None, :], r_own[..., None] + c_own[..., None, :])


def torch_cutnmix_views(
    images: torch.Tensor,
    params: CutNMixParams,
    mean32: np.ndarray,
    inv_std32: np.ndarray,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """images uint8 [B,H,W,3] -> views [P,B,3,H,W] out_dtype (each views[k] channels-last)."""
    b, h, w, _ = images.shape
    P = params.peers
    if params.mode == "mixup":
        src = normalised_padded_source(images, params.pad, mean32, inv_std32, torch.float32)
        na = src.index_select(0, source_index(params, h, w, "own").reshape(-1))
        nb = src.index_select(0, source_index(params, h, w, "partner").reshape(-1))
        lam = params.lam.repeat_interleave(h * w).repeat(P)[:, None]  # [P*B*H*W, 1]
        out = (lam * na + (1.0 - lam) * nb).to(out_dtype)
    else:
        src = normalised_padded_source(images, params.pad, mean32, inv_std32, out_dtype)
        which = "box" if params.mode in BOX_MODES else "own"
        out = src.index_select(0, source_index(params, h, w, which).reshape(-1))
    return out.view(P, b, h, w, 3).permute(0, 1, 4, 2, 3)
