"""Shared test set-up: deterministic seeds, the `gpu` marker, Triton's CPU interpreter, exact fp32 on CUDA."""

from __future__ import annotations

import contextlib
import os
import random
import signal

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

# Tests send Ctrl-C (SIGINT) to child processes. A process started in the background inherits
# SIGINT *ignored* (POSIX shells do that for `cmd &`; CI runners may too), and an ignored signal
# stays ignored across exec, so the children would never see it. A handled signal is reset to the
# default on exec: handle it here as Python does in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


# (module, attribute) of every flag `fp32_exact` sets, in restore order
FP32_EXACT_FLAGS = {
    (torch.backends.cuda.matmul, "allow_tf32"): False,   # TF32 matmuls keep 10 mantissa bits
    (torch.backends.cudnn, "allow_tf32"): False,          # ... and so do TF32 convolutions
    (torch.backends.cudnn, "deterministic"): True,        # one algorithm per shape, every time
    (torch.backends.cudnn, "benchmark"): False,           # no timing-based algorithm choice
}


@contextlib.contextmanager
def fp32_exact():
    """float32 on CUDA as float32: TF32 off for matmuls and cuDNN, deterministic cuDNN
    algorithms; every flag restored on exit (also on an error)."""
    saved = {key: getattr(*key) for key in FP32_EXACT_FLAGS}
    try:
        for (module, name), value in FP32_EXACT_FLAGS.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


@pytest.fixture
def cuda_fp32_exact():
    """For tests that compare two float32 CUDA computations (different cuDNN algorithms, a graph
    against eager): TF32 off and deterministic cuDNN for the test, the flags restored after."""
    with fp32_exact():
        yield
