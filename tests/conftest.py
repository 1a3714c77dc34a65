"""Shared test set-up: deterministic seeds, the `gpu` marker, Triton's CPU interpreter."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Without CUDA, Triton kernels run on CPU tensors through its interpreter. The variable is read
# when triton is imported, so it is set here, before any test module imports the kernels.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (python, numpy, torch) and torch thread count
    (the thread count changes CPU summation order: a test that changed it must not change what
    the next one computes)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(TORCH_THREADS)
    yield


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
