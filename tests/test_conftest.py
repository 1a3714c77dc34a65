"""The shared fixtures of tests/conftest.py (CPU: the backend flags exist without a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import FP32_EXACT_FLAGS, fp32_exact


def _flags() -> dict:
    return {key: getattr(*key) for key in FP32_EXACT_FLAGS}


def _set(values) -> None:
    for (module, name), value in zip(FP32_EXACT_FLAGS, values):
        setattr(module, name, value)


def test_fp32_exact_turns_tf32_off_and_restores_every_flag():
    """From every starting combination of the four flags: inside, TF32 off and deterministic
    cuDNN; after (normal exit and an error), exactly the starting values."""
    outer = _flags()
    try:
        for start in itertools.product((False, True), repeat=len(FP32_EXACT_FLAGS)):
            _set(start)
            before = _flags()
            with fp32_exact():
                assert _flags() == FP32_EXACT_FLAGS
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                assert torch.backends.cudnn.deterministic
            assert _flags() == before
            with pytest.raises(ZeroDivisionError), fp32_exact():
                _ = 1 / 0
            assert _flags() == before
    finally:
        _set(outer.values())
    assert _flags() == outer


def test_cuda_fp32_exact_fixture_is_the_context(cuda_fp32_exact):
    assert _flags() == FP32_EXACT_FLAGS
