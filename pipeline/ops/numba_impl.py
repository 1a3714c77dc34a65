"""Compiled CPU Cut^nMix (numba): one pass over the output, the fast CPU training path.

Same semantics as `pipeline.ops.reference` (docs/design.md#cutnmix-views; Shen et al.,
arXiv 2206.12370 as formulated by this project). Why it is fast on a CPU where a chain of torch
ops is not: every torch op is a full pass over memory (~1.5 ns/element on this 2-core box), and
the torch path needs several; here each output row is written once, as at most three
contiguous segments (left of the box: own view, box: partner's view, right: own view), each
a tight loop of `out = lut[c, pixel]` where `lut` [3,256] holds norm(p) already rounded to the
output dtype (so the values are the reference's bit for bit). Output dtypes are handled as
same-width integers (int16 for bf16/fp16, int32 for fp32), so one compiled kernel serves all.
Mixup blends in float32 (lam*lut32[a] + (1-lam)*lut32[b], no FMA contraction: numba compiles
without fast-math) and writes float32 or bfloat16 (rounded to nearest even in the kernel);
float16 is cast by torch. Per pixel, parameters hoisted, source rows resolved once per output
row (see `_numba_kernels`).

numba is imported lazily (it comes with ffcv); without it `available()` is False and the
pure-torch path (`pipeline.ops.torch_impl`) is used instead. Samples run in parallel (prange).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from pipeline.ops.params import BOX_MODES, CutNMixParams

_kernels = None
# numba's fallback "workqueue" threading layer aborts the process when two Python threads enter
# parallel code at once (tbb and omp do not); calls are serialised, which costs nothing here.
_lock = threading.Lock()


_disabled: str | None = None


def available() -> bool:
    """numba imports (and has not failed to compile the kernels in this process)."""
    if _disabled is not None:
        return False
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def disable(reason: str) -> None:
    """Stop using numba in this process (impl="auto" falls back to torch), with one warning."""
    global _disabled
    if _disabled is None:
        warnings.warn(f"numba Cut^nMix kernel unusable, using the torch path: {reason}", stacklevel=3)
    _disabled = reason


def _build():
    global _kernels
    if _kernels is None:
        from pipeline.ops import _numba_kernels as kern

        _kernels = (kern.box_kernel, kern.blend_kernel)
    return _kernels


def lut(mean32: np.ndarray, inv_std32: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """dtype [3,256]: norm(p) for every channel and pixel value, rounded once to dtype."""
    p = torch.arange(256, dtype=torch.float32)
    return ((p[None, :] - torch.as_tensor(mean32)[:, None]) * torch.as_tensor(inv_std32)[:, None]).to(dtype)


def _int_view(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


def numba_cutnmix_views(
    images: torch.Tensor,
    params: CutNMixParams,
    mean32: np.ndarray,
    inv_std32: np.ndarray,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """images uint8 [B,H,W,3] (CPU) -> views [P,B,3,H,W] out_dtype (each views[k] channels-last)."""
    box_kernel, blend_kernel = _build()
    b, h, w, _ = images.shape
    P = params.peers
    imgs = images.contiguous().numpy()
    oy, ox = params.offset_y.numpy(), params.offset_x.numpy()
    fl = params.flip.numpy()
    perm = params.perm.numpy()
    if params.mode == "mixup":
        # float32 and bfloat16 are written by the kernel (bf16 rounded to nearest even in it);
        # float16 is blended in float32 and cast by torch
        direct = out_dtype in (torch.float32, torch.bfloat16)
        out = torch.empty((P, b, h, w, 3), dtype=out_dtype if direct else torch.float32)
        with _lock:
            blend_kernel(
                imgs,
                lut(mean32, inv_std32, torch.float32).numpy(),
                oy,
                ox,
                fl,
                perm,
                params.lam.numpy(),
                params.pad,
                _int_view(out) if out.dtype == torch.bfloat16 else out.numpy(),
                out.dtype == torch.bfloat16,
            )
        out = out.to(out_dtype)
    else:
        out = torch.empty((P, b, h, w, 3), dtype=out_dtype)
        table = _int_view(lut(mean32, inv_std32, out_dtype))
        if params.mode in BOX_MODES:
            bh, bw, by, bx = (
                params.box_h.numpy(),
                params.box_w.numpy(),
                params.box_y.numpy(),
                params.box_x.numpy(),
            )
        else:
            bh = bw = np.zeros(b, dtype=np.int64)
            by = bx = np.zeros((P, b), dtype=np.int64)
        with _lock:
            box_kernel(imgs, table, oy, ox, fl, perm, bh, bw, by, bx, params.pad, _int_view(out))
    return out.permute(0, 1, 4, 2, 3)
