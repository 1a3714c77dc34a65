"""Random parameters of Cut^nMix and how they are drawn (docs/design.md#cutnmix-views).

Cut^nMix (Shen et al., "Mixed Sample Augmentation for Online Distillation", arXiv 2206.12370,
as formulated in docs/design.md#cutnmix-views) turns a uint8 batch into one view per peer. All of
its randomness is collected in one `CutNMixParams`; the functional core (`pipeline.ops.cutnmix`, in core.py)
is a pure function of the images and these parameters, so every implementation (reference,
vectorised torch, numba, Triton, DALI, per-sample numpy) can be checked against every other.

Semantics of the parameters, for peer k and sample i of a batch of B images of H x W:

- Base view (random translate + horizontal flip, as in CIFAR training and in PCL): zero-pad the
  image by `pad` pixels on every side, crop H x W at offset (offset_y[k,i], offset_x[k,i]) in
  [0, 2*pad] of the padded image, THEN flip the crop left-right if flip[k,i]:
      base[k,i][y, x] = img_i[y + offset_y - pad, xs + offset_x - pad]   (0 outside img_i)
      with xs = W-1-x if flipped else x.
- Partner: `perm` (one permutation for the batch, shared by the peers); y_b = labels[perm].
- Box modes (cutnmix, cutmix): per sample a box of box_h x box_w (shared by the peers), at
  (box_y[k,i], box_x[k,i]) for peer k, fully inside the image. Inside peer k's box the pixels
  are the partner's peer-k base view base[k, perm[i]]; outside, base[k,i].
  lam[i] = 1 - box_h*box_w/(H*W) computed in float32 (exact when H*W is a power of two).
  An unmixed sample has box_h = box_w = 0 and lam = 1.
- Blend mode (mixup): no boxes; lam[i] ~ Beta(alpha, alpha) where mixed, else 1, and
  view = lam * norm(base[k,i]) + (1 - lam) * norm(base[k,perm[i]]) in float32.
- none: base views only; perm is the identity (so y_b = y_a), lam = 1, no boxes.

Normalisation is per channel in pixel units: norm(p)[c] = (float32(p) - mean32[c]) * inv_std32[c]
with mean32 = float32(mean) and inv_std32 = float32(1 / std) (reciprocal taken in float64), then
one rounding to the output dtype (round to nearest even). Every implementation uses exactly these
float32 operations, which is why they agree bit for bit in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from pipeline.choices import BOX_MODES
from pipeline.choices import MIX_MODES as MODES  # the op's modes, declared once
from pipeline.errors import CnmError

# CIFAR-10's per-channel train mean/std in pixel units: the op's default normalisation
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)
OUT_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
TENSOR_FIELDS = (
    "offset_y",
    "offset_x",
    "flip",
    "perm",
    "mixed",
    "lam",
    "box_h",
    "box_w",
    "box_y",
    "box_x",
)


@dataclass(frozen=True)
class CutNMixParams:
    """Every random choice of one Cut^nMix batch (P peers, B samples). See the module docstring.

    Fields (all on one device):
        mode      str: "cutnmix" | "cutmix" | "mixup" | "none" (static, not a tensor)
        pad       int: zero padding of the random translate (static)
        offset_y  int64 [P,B] in [0, 2*pad]: crop row offset in the padded image
        offset_x  int64 [P,B] in [0, 2*pad]: crop column offset in the padded image
        flip      bool  [P,B]: flip the crop left-right
        perm      int64 [B]: partner of each sample (a permutation)
        mixed     bool  [B]: whether the sample is mixed
        lam       float32 [B]: weight of y_a (1.0 where not mixed)
        box_h     int64 [B]: box height (0 where not mixed or in mixup/none)
        box_w     int64 [B]: box width
        box_y     int64 [P,B]: top row of peer k's box, 0 <= box_y <= H - box_h
        box_x     int64 [P,B]: left column of peer k's box, 0 <= box_x <= W - box_w
    """

    mode: str
    pad: int
    offset_y: torch.Tensor
    offset_x: torch.Tensor
    flip: torch.Tensor
    perm: torch.Tensor
    mixed: torch.Tensor
    lam: torch.Tensor
    box_h: torch.Tensor
    box_w: torch.Tensor
    box_y: torch.Tensor
    box_x: torch.Tensor

    @property
    def peers(self) -> int:
        return int(self.offset_y.shape[0])

    @property
    def batch(self) -> int:
        return int(self.perm.shape[0])

    @property
    def device(self) -> torch.device:
        return self.perm.device

    @property
    def blend(self) -> bool:
        """True for mixup (convex blend with the partner), False for box pasting / none."""
        return self.mode == "mixup"

    def to(self, device) -> "CutNMixParams":
        return replace(self, **{f: getattr(self, f).to(device) for f in TENSOR_FIELDS})

    def numpy(self) -> dict:
        """The parameters as numpy arrays (plus `mode` and `pad`), for the numpy/DALI paths."""
        out = {f: getattr(self, f).detach().cpu().numpy() for f in TENSOR_FIELDS}
        out["mode"] = self.mode
        out["pad"] = self.pad
        return out

    @classmethod
    def from_numpy(cls, d: dict, device="cpu") -> "CutNMixParams":
        """Inverse of `numpy()`; integer fields become int64, lam float32, flags bool."""
        conv = {}
        for f in TENSOR_FIELDS:
            a = np.asarray(d[f])
            if f in ("flip", "mixed"):
                t = torch.as_tensor(a.astype(bool))
            elif f == "lam":
                t = torch.as_tensor(a.astype(np.float32))
            else:
                t = torch.as_tensor(a.astype(np.int64))
            conv[f] = t.to(device)
        return cls(mode=str(d["mode"]), pad=int(d["pad"]), **conv)


# ----------------------------------------------------------------------------------- checks


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CnmError(f"unknown Cut^nMix mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def resolve_dtype(out_dtype) -> torch.dtype:
    """torch.float32/float16/bfloat16 (or their names) -> torch dtype; anything else: CnmError."""
    if isinstance(out_dtype, str):
        if out_dtype not in OUT_DTYPES:
            raise CnmError(f"unsupported output dtype {out_dtype!r}: use float32, float16 or bfloat16")
        return OUT_DTYPES[out_dtype]
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CnmError(f"unsupported output dtype {out_dtype}: use float32, float16 or bfloat16")
    return out_dtype


def norm_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(mean32, inv_std32), float32 [3]: the exact constants every implementation uses."""
    try:
        m = np.asarray(mean, dtype=np.float64).reshape(-1)
        s = np.asarray(std, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CnmError(f"mean and std must be 3 numbers each, got {mean!r} and {std!r}") from None
    if m.shape != (3,) or s.shape != (3,):
        raise CnmError(f"mean and std must have 3 values (one per RGB channel), got {len(m)} and {len(s)}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s > 0)):
        raise CnmError(f"mean must be finite and std positive, got mean={list(m)} std={list(s)}")
    return m.astype(np.float32), (1.0 / s).astype(np.float32)


def check_config(peers: int, mode: str, alpha: float, mix_prob: float, pad: int) -> None:
    """One-line CnmError for any bad hyper-parameter."""
    check_mode(mode)
    if isinstance(peers, bool) or not isinstance(peers, (int, np.integer)) or peers < 1:
        raise CnmError(f"peers must be a positive integer, got {peers!r}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise CnmError(f"pad must be a non-negative integer, got {pad!r}")
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise CnmError(f"alpha must be a positive number (Beta(alpha, alpha)), got {alpha!r}")
    if not (isinstance(mix_prob, (int, float)) and 0.0 <= mix_prob <= 1.0):
        raise CnmError(f"mix_prob must be in [0, 1], got {mix_prob!r}")


def check_images(images: torch.Tensor) -> tuple[int, int, int]:
    """images must be uint8 [B,H,W,3]; returns (B, H, W)."""
    if not isinstance(images, torch.Tensor):
        raise CnmError(f"images must be a torch.Tensor (uint8 [B,H,W,3]), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise CnmError(
            f"images must be uint8 [B,H,W,3] (channels last), got {images.dtype} {list(images.shape)}"
        )
    b, h, w, _ = images.shape
    if b < 1 or h < 1 or w < 1:
        raise CnmError(f"images must be non-empty, got shape {list(images.shape)}")
    return int(b), int(h), int(w)


def check_params(params: CutNMixParams, batch: int, device: torch.device) -> None:
    """Shapes, dtypes and device of params against a batch (no host sync)."""
    if not isinstance(params, CutNMixParams):
        raise CnmError(f"params must be a CutNMixParams, got {type(params).__name__}")
    check_mode(params.mode)
    p = params.offset_y.shape[0] if params.offset_y.dim() == 2 else -1
    want = {
        "offset_y": ((p, batch), torch.int64),
        "offset_x": ((p, batch), torch.int64),
        "flip": ((p, batch), torch.bool),
        "perm": ((batch,), torch.int64),
        "mixed": ((batch,), torch.bool),
        "lam": ((batch,), torch.float32),
        "box_h": ((batch,), torch.int64),
        "box_w": ((batch,), torch.int64),
        "box_y": ((p, batch), torch.int64),
        "box_x": ((p, batch), torch.int64),
    }
    if p < 1:
        raise CnmError(f"params.offset_y must be [P,B] with P >= 1, got {list(params.offset_y.shape)}")
    for name, (shape, dtype) in want.items():
        t = getattr(params, name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CnmError(
                f"params.{name} must be {str(dtype).replace('torch.', '')} {list(shape)} for a batch of "
                f"{batch}, got {str(t.dtype).replace('torch.', '')} {list(t.shape)}"
            )
        if t.device != device:
            raise CnmError(f"params.{name} is on {t.device} but the images are on {device}")


def check_param_values(params: CutNMixParams, height: int, width: int) -> None:
    """Value ranges of params (syncs with the device: for tests and the reference only)."""
    pad = params.pad
    for name in ("offset_y", "offset_x"):
        t = getattr(params, name)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2 * pad):
            raise CnmError(f"params.{name} must lie in [0, {2 * pad}] (pad={pad})")
    b = params.batch
    if not torch.equal(torch.sort(params.perm.cpu()).values, torch.arange(b)):
        raise CnmError("params.perm must be a permutation of 0..B-1")
    h, w = params.box_h.cpu(), params.box_w.cpu()
    if int(h.min()) < 0 or int(h.max()) > height or int(w.min()) < 0 or int(w.max()) > width:
        raise CnmError(f"params.box_h/box_w must lie in [0, {height}] x [0, {width}]")
    by, bx = params.box_y.cpu(), params.box_x.cpu()
    if bool((by < 0).any() or (bx < 0).any() or (by + h > height).any() or (bx + w > width).any()):
        raise CnmError("every box must lie inside the image (0 <= box_y <= H - box_h, same for x)")


# ------------------------------------------------------------------------------------ draws


def box_lam(box_h: torch.Tensor, box_w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """lam = 1 - h*w/(H*W) in float32 (the one formula every path uses)."""
    return 1.0 - (box_h * box_w).to(torch.float32) / float(height * width)


def sample_beta(alpha: float, n: int, device, generator) -> torch.Tensor:
    """float32 [n] ~ Beta(alpha, alpha) on `device` from `generator`, no host sync.

    Beta(a, a) is the first coordinate of a Dirichlet(a, a) draw (two gamma variates).
    """
    conc = torch.full((n, 2), float(alpha), dtype=torch.float32, device=device)
    return torch._sample_dirichlet(conc, generator=generator)[:, 0].contiguous()


def draw_params(
    batch: int,
    peers: int,
    height: int,
    width: int,
    *,
    mode: str = "cutnmix",
    alpha: float = 1.0,
    mix_prob: float = 0.5,
    pad: int = 4,
    flip: bool = True,
    device=None,
    generator: torch.Generator | None = None,
) -> CutNMixParams:
    """Draw every random parameter of one batch on `device` with no host synchronisation.

    The draws come from `generator` (None: torch's default generator of that device) in a fixed
    order, the same in every mode, so one seed gives the same base views whatever the mode:
    offset_y [P,B], offset_x [P,B], flip [P,B], perm [B], mixed [B], Beta [B], box_y u [P,B],
    box_x u [P,B]. Box side: h = round(H*sqrt(1-l)), w = round(W*sqrt(1-l)), l ~ Beta(alpha, alpha)
    (round half to even); positions uniform on {0..H-h} x {0..W-w} (floor(u*(H-h+1))). In cutmix
    every peer uses peer 0's position. All shapes are static (no data-dependent sizes), so the
    draw is CUDA-graph capturable when the generator is.
    """
    check_config(peers, mode, alpha, mix_prob, pad)
    if batch < 1 or height < 1 or width < 1:
        raise CnmError(f"batch, height and width must be positive, got {batch}, {height}, {width}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise CnmError(f"the generator is on {generator.device} but the batch is on {device}")
    g = generator
    P, B = int(peers), int(batch)
    i64 = dict(dtype=torch.int64, device=device)

    offset_y = torch.randint(0, 2 * pad + 1, (P, B), generator=g, **i64)
    offset_x = torch.randint(0, 2 * pad + 1, (P, B), generator=g, **i64)
    flips = torch.randint(0, 2, (P, B), generator=g, **i64).bool()
    if not flip:
        flips = torch.zeros_like(flips)
    perm = torch.randperm(B, generator=g, **i64)
    mixed = torch.rand(B, generator=g, device=device) < mix_prob
    beta = sample_beta(alpha, B, device, g)
    uy = torch.rand((P, B), generator=g, device=device)
    ux = torch.rand((P, B), generator=g, device=device)

    zeros_b = torch.zeros(B, **i64)
    zeros_pb = torch.zeros((P, B), **i64)
    if mode in BOX_MODES:
        side = torch.sqrt(1.0 - beta)
        box_h = torch.where(mixed, torch.round(side * height).to(torch.int64), zeros_b)
        box_w = torch.where(mixed, torch.round(side * width).to(torch.int64), zeros_b)
        if mode == "cutmix":  # one position for all peers: peer 0's draw
            uy, ux = uy[:1].expand(P, B), ux[:1].expand(P, B)
        box_y = torch.minimum(torch.floor(uy * (height - box_h + 1)).to(torch.int64), height - box_h)
        box_x = torch.minimum(torch.floor(ux * (width - box_w + 1)).to(torch.int64), width - box_w)
        lam = box_lam(box_h, box_w, height, width)
    else:
        box_h, box_w, box_y, box_x = zeros_b, zeros_b.clone(), zeros_pb, zeros_pb.clone()
        if mode == "mixup":
            lam = torch.where(mixed, beta, torch.ones_like(beta))
        else:  # none: base views only
            perm = torch.arange(B, **i64)
            mixed = torch.zeros_like(mixed)
            lam = torch.ones(B, dtype=torch.float32, device=device)
    return CutNMixParams(
        mode=mode,
        pad=int(pad),
        offset_y=offset_y,
        offset_x=offset_x,
        flip=flips,
        perm=perm,
        mixed=mixed,
        lam=lam.to(torch.float32),
        box_h=box_h,
        box_w=box_w,
        box_y=box_y.contiguous(),
        box_x=box_x.contiguous(),
    )


def make_params(
    *,
    peers: int,
    batch: int,
    mode: str = "cutnmix",
    pad: int = 0,
    height: int = 32,
    width: int = 32,
    offset_y=None,
    offset_x=None,
    flip=None,
    perm=None,
    mixed=None,
    lam=None,
    box_h=None,
    box_w=None,
    box_y=None,
    box_x=None,
    device="cpu",
) -> CutNMixParams:
    """Hand-built parameters (tests, edge cases): anything left out is neutral (no shift, no
    flip, identity perm, no box). In box modes lam/mixed follow from the box when not given."""
    P, B = peers, batch

    def t(x, shape, dtype, fill):
        if x is None:
            return torch.full(shape, fill, dtype=dtype, device=device)
        return torch.as_tensor(np.asarray(x)).to(dtype).reshape(shape).to(device)

    bh = t(box_h, (B,), torch.int64, 0)
    bw = t(box_w, (B,), torch.int64, 0)
    if mixed is None:
        mixed_t = (bh * bw > 0) if mode in BOX_MODES else torch.zeros(B, dtype=torch.bool, device=device)
    else:
        mixed_t = t(mixed, (B,), torch.bool, False)
    if lam is None:
        lam_t = box_lam(bh, bw, height, width) if mode in BOX_MODES else torch.ones(B, device=device)
    else:
        lam_t = t(lam, (B,), torch.float32, 1.0)
    perm_t = torch.arange(B, device=device) if perm is None else t(perm, (B,), torch.int64, 0)
    return CutNMixParams(
        mode=check_mode(mode),
        pad=pad,
        offset_y=t(offset_y, (P, B), torch.int64, pad),
        offset_x=t(offset_x, (P, B), torch.int64, pad),
        flip=t(flip, (P, B), torch.bool, False),
        perm=perm_t,
        mixed=mixed_t,
        lam=lam_t,
        box_h=bh,
        box_w=bw,
        box_y=t(box_y, (P, B), torch.int64, 0),
        box_x=t(box_x, (P, B), torch.int64, 0),
    )
