"""Online-distillation losses, per peer (this project's formulation, docs/design.md#losses).

Peer k has logits `z_k` and a pooled feature `f_k`; all functions return one value per peer
(shape `[P]`, float32) so the caller can weight, log and sum them. All math runs in float32
even under bf16 autocast (inputs are cast with `.float()`; softmax/log-softmax/means are not
autocast-lowered ops). Nothing here synchronises with the host.

- `mixed_ce`: mixed cross-entropy of CutMix (Yun et al. 2019): `lam·CE(z, y_a) + (1-lam)·CE(z, y_b)`,
  batch mean, optionally weighted per sample (`--mix-target teacher`).
- `kd_loss`: Hinton et al. 2015 distillation, `T²·KL(softmax(t/T) || softmax(z/T))`, batch mean
  of the per-sample KL (`batchmean`); the teacher is detached.
- `fml_loss`: feature-level mutual learning: `mean_{j≠k} ||f̂_k - stopgrad(f̂_j)||²` on
  L2-normalised features; `||·||²` is the per-sample squared Euclidean distance (summed over
  the F feature dimensions, so it lies in [0, 4]), then a batch mean.
- `shared_content`: which samples every peer sees with the same content (docs/design.md#losses).
- `rampup`: the consistency ramp-up of Laine & Aila 2017 / Tarvainen & Valpola 2017,
  `exp(-5(1 - min(e/R, 1))²)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import CnmError


def _per_sample_ce(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`logp [P, B, K]` log-probabilities, `y [B]` int64 -> `[P, B]` negative log-likelihoods."""
    index = y.view(1, -1, 1).expand(logp.shape[0], -1, 1)
    return -logp.gather(2, index).squeeze(2)


def mixed_ce(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
             lam: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mixed cross-entropy per peer.

    logits `[P, B, K]` (any float dtype), y_a / y_b `[B]` int64, lam `[B]` (float; 1 where the
    sample is not mixed), optional `weight [B]` (float, per sample) -> `[P]` float32:
    `mean_b w_b·[lam_b·CE(z_kb, y_a_b) + (1-lam_b)·CE(z_kb, y_b_b)]` (w = 1 without `weight`;
    the mean is over all B samples either way).
    """
    if logits.dim() != 3:
        raise CnmError(f"logits must be [P, B, K], got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    lam = lam.float().view(1, -1)
    loss = lam * _per_sample_ce(logp, y_a) + (1.0 - lam) * _per_sample_ce(logp, y_b)
    if weight is not None:
        loss = loss * weight.float().view(1, -1)
    return loss.mean(dim=1)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last dim of `x [..., B]`, over the samples with weight 1 when `weight [B]`
    (0/1) is given: `sum_b w_b x_b / max(sum_b w_b, 1)` (0 when no sample counts; no host sync)."""
    if weight is None:
        return x.mean(dim=-1)
    w = weight.to(x.dtype)
    return (x * w).sum(dim=-1) / w.sum().clamp_min(1.0)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Knowledge-distillation loss per peer.

    student `[P, B, K]`, teacher `[B, K]` (one target for every peer) or `[P, B, K]` (one per
    peer), temperature `T > 0`, optional `weight [B]` (0/1: the samples that count) -> `[P]`
    float32: `T² · mean_b KL(softmax(t_b/T) || softmax(z_kb/T))`, the mean over the counted
    samples. The teacher is detached: no gradient reaches it.
    """
    if T <= 0:
        raise CnmError(f"temperature must be > 0, got {T}")
    z = student.float() / T
    t = teacher.detach().float() / T
    if t.dim() == 2:
        t = t.unsqueeze(0)
    log_q = torch.log_softmax(z, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)         # [P, B]
    return _masked_mean(kl, weight) * (T * T)


def fml_loss(features: Sequence[torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
    """Feature-level mutual learning per peer.

    features: P tensors `[B, F]` (any float dtype, equal F), optional `weight [B]` (0/1: the
    samples that count) -> `[P]` float32:
    `loss_k = 1/(P-1) · Σ_{j≠k} mean_b ||f̂_kb - stopgrad(f̂_jb)||²`, f̂ = f / ||f||₂, the mean over
    the counted samples. Peer k's loss pulls only peer k (the other peers are stop-gradient
    targets). P = 1 -> `[0.]`.
    Unequal feature sizes (a mixed ensemble) -> CnmError: pass --no-fml.
    """
    P = len(features)
    if P == 0:
        raise CnmError("fml_loss needs at least one peer's features")
    dims = [int(f.shape[-1]) for f in features]
    if len(set(dims)) > 1:
        raise CnmError(f"feature-level mutual learning needs equal feature sizes, got {dims} "
                       "(a mixed ensemble); pass --no-fml")
    if P == 1:
        return features[0].new_zeros(1, dtype=torch.float32)
    f = F.normalize(torch.stack([x.float() for x in features]), dim=-1)   # [P, B, F]
    target = f.detach()
    # diff[k, j] = f̂_k - sg(f̂_j); the j = k term is 0 in value and in gradient (2(f̂_k - f̂_k)).
    dist = (f.unsqueeze(1) - target.unsqueeze(0)).square().sum(dim=-1)    # [P, P, B]
    return _masked_mean(dist, weight).sum(dim=1) / (P - 1)


def shared_content(lam: torch.Tensor, mode: str) -> torch.Tensor:
    """`[B]` bool: True where every peer's view shows the same content up to its crop and flip.

    Only Cut^nMix (`mode == "cutnmix"`) gives a mixed sample's peers different content (the box,
    of one size, lies at a different place for every peer, so one peer may see the partner's
    object where another sees its own); an unmixed sample (lam = 1) and every sample of cutmix,
    mixup and none are shared. lam float `[B]` (1.0 where not mixed).
    """
    if mode == "cutnmix":
        return lam == 1
    return torch.ones_like(lam, dtype=torch.bool)


def rampup(epoch: float, rampup_epochs: float = 80) -> float:
    """Ramp-up weight `exp(-5 (1 - min(epoch / R, 1))²)`; 1 for `R = 0`. `epoch` may be fractional."""
    if rampup_epochs < 0:
        raise CnmError(f"rampup epochs must be >= 0, got {rampup_epochs}")
    if rampup_epochs == 0:
        return 1.0
    t = min(max(float(epoch), 0.0) / rampup_epochs, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


__all__ = ["fml_loss", "kd_loss", "mixed_ce", "rampup", "shared_content"]
