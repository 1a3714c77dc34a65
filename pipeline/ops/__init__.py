"""Cut^nMix and its variants as batch ops (docs/design.md#cutnmix-views).

    from pipeline.ops import CutNMix
    aug = CutNMix(peers=3, mode="cutnmix", alpha=1.0, mix_prob=0.5, pad=4, flip=True,
                  mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7), out_dtype=torch.bfloat16)
    views, y_a, y_b, lam = aug(images, labels, generator=g)

`cutnmix(images, labels, params, ...)` is the functional core, `draw_params(...)` draws its
`CutNMixParams` on the device. Back-ends (numba, triton, DALI) are imported lazily.
"""

from pipeline.ops.core import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMPLS,
    LAYOUTS,
    CutNMix,
    cutnmix,
    grouped_layout,
    resolve_impl,
)
from pipeline.ops.params import MODES, CutNMixParams, draw_params, make_params

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMPLS",
    "LAYOUTS",
    "MODES",
    "CutNMix",
    "CutNMixParams",
    "cutnmix",
    "draw_params",
    "grouped_layout",
    "make_params",
    "resolve_impl",
]
