"""`--sync-bn`: BatchNorm over the global batch of all ranks. `torch.nn.SyncBatchNorm` on CUDA;
`ReferenceSyncBatchNorm` (the same statistics from differentiable all-reduces) on the CPU, where
torch's has no kernels. See docs/distributed.md#batchnorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.nn.functional import all_reduce
except ImportError:  # a torch build without torch.distributed: no group, so forward never calls it
    all_reduce = None

from pipeline.errors import CnmError


class ReferenceSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the GLOBAL batch (all ranks).

    The plain formulation of `torch.nn.SyncBatchNorm` (Peng et al., "MegDet", CVPR 2018) from
    `torch.distributed.nn.functional.all_reduce` (whose backward all-reduces the incoming
    gradients), so it runs on any back-end, gloo included:

        N    = sum_r n_r                          (n_r = B_r*H*W elements per channel on rank r)
        mean = sum_r sum(x_r) / N
        var  = sum_r sum((x_r - mean)^2) / N      (two passes: no E[x^2]-E[x]^2 cancellation)
        y_r  = (x_r - mean) / sqrt(var + eps) * weight + bias
        running_mean += momentum * (mean - running_mean)
        running_var  += momentum * (var * N/(N-1) - running_var)

    The backward gives rank r d(sum_q L_q)/dx_r, as torch's SyncBatchNorm does. Not in training
    mode, or without a process group of more than one rank, it is `nn.BatchNorm2d`.
    Input/output: float [B, C, H, W] (computed in at least float32, returned in x's dtype).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _group_size() < 2:
            return super().forward(x)
        if self.momentum is None:
            raise CnmError("ReferenceSyncBatchNorm needs a BatchNorm momentum (cumulative averaging "
                           "is not supported)")
        self._check_input_dim(x)
        C = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))        # bf16/fp16 -> fp32
        count = torch.full((1,), xf.numel() // C, dtype=xf.dtype, device=x.device)
        sums = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
        n = sums[C:].detach()
        mean = sums[:C] / n
        xc = xf - mean.view(1, C, 1, 1)
        var = all_reduce((xc * xc).sum((0, 2, 3))) / n
        y = xc * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                rm, rv = self.running_mean, self.running_var
                rm.lerp_(mean.detach().to(rm.dtype), self.momentum)
                unbiased = var.detach() * (n / torch.clamp(n - 1, min=1))
                rv.lerp_(unbiased.to(rv.dtype), self.momentum)
        return y.to(x.dtype)


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d of `module` becomes a synchronised one, sharing its parameters and
    buffers (state-dict keys unchanged, so checkpoints stay interchangeable).
    CUDA: `torch.nn.SyncBatchNorm.convert_sync_batchnorm`; CPU: `ReferenceSyncBatchNorm`."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_reference(module)


def _convert_reference(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, ReferenceSyncBatchNorm):
        out = ReferenceSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, device="meta")
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, _convert_reference(child))
        return out
    for name, child in module.named_children():
        new = _convert_reference(child)
        if new is not child:
            setattr(module, name, new)
    return module
