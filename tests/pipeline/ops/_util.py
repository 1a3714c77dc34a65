"""Helpers shared by the Cut^nMix tests: inputs, oracles, and ulp comparison."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import backends

MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)

# The Triton kernel runs on CPU tensors only through the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 when there is no CUDA device; on a GPU box the gpu-marked tests cover it).
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not backends.available("triton"),
    reason="needs triton with TRITON_INTERPRET=1 (CPU tensors)",
)


def images(b: int, h: int, w: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """uint8 [B,H,W,3] random pixels (every value 0..255 likely present, incl. 0 and 255)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)
    x.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    return x.to(device)


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """int64 such that adjacent floats of t's dtype differ by exactly 1 (sign-magnitude -> linear)."""
    width = t.element_size() * 8
    ints = t.contiguous().view({16: torch.int16, 32: torch.int32}[width]).to(torch.int64)
    sign_bit = 1 << (width - 1)
    mag = ints & (sign_bit - 1)
    return torch.where(ints < 0, -mag, mag)


def assert_within_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (ordered_bits(actual.cpu()) - ordered_bits(expected.cpu())).abs()
    assert int(diff.max()) <= ulps, f"max difference {int(diff.max())} ulp at {int(diff.argmax())}"


def assert_views_equal(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 0) -> None:
    """Exact (ulps=0) or within `ulps` of the output dtype."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype
    if ulps == 0:
        a, e = actual.cpu(), expected.cpu()
        if not torch.equal(a, e):
            bad = (a != e).nonzero()
            raise AssertionError(
                f"{len(bad)} values differ, first at {bad[0].tolist()}: "
                f"{a[tuple(bad[0])].item()} vs {e[tuple(bad[0])].item()}"
            )
    else:
        assert_within_ulp(actual, expected, ulps)
