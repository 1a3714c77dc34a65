"""CUDA checks of Cut^nMix (`PYTHONPATH=. pytest -m gpu`): the Triton kernel and the torch path
on CUDA equal the reference on CUDA and each other bit for bit in every dtype (both round to
nearest even); the grouped layout; no host synchronisation; outputs stay on the device."""

from __future__ import annotations

import pytest
import torch

from pipeline.ops import MODES, CutNMix, cutnmix, draw_params, grouped_layout, resolve_impl
from pipeline.ops.numpy_baseline import numpy_cutnmix
from tests.pipeline.ops._util import MEAN, STD, assert_views_equal, images

pytestmark = pytest.mark.gpu
BIG_BATCH = 4097  # odd, many more programs than SMs


def _views(imgs, params, impl, dtype):
    return cutnmix(
        imgs,
        torch.arange(imgs.shape[0], device=imgs.device),
        params,
        mean=MEAN,
        std=STD,
        out_dtype=dtype,
        impl=impl,
    )[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("peers", [1, 3, 5])
def test_triton_and_torch_on_cuda_equal_reference_on_cuda(cuda_device, mode, peers):
    pytest.importorskip("triton")
    b, h, w = 5, 32, 32
    g = torch.Generator(device=cuda_device).manual_seed(peers)
    params = draw_params(b, peers, h, w, mode=mode, mix_prob=0.8, generator=g, device=cuda_device)
    imgs = images(b, h, w, seed=peers, device=cuda_device)
    ref32 = _views(imgs, params, "reference", torch.float32)  # slow per-pixel Python: once
    assert ref32.device == imgs.device
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = ref32.to(dtype)  # what the reference does for a half dtype: one rounding
        outs = {}
        for impl in ("triton", "torch"):
            outs[impl] = out = _views(imgs, params, impl, dtype)
            assert out.device == imgs.device and out.dtype == dtype
            # on CUDA every path rounds to nearest even: exact (the 1-ulp slack of the tests on
            # CPU is for the Triton interpreter's bf16 truncation only)
            assert_views_equal(out, ref)
        assert_views_equal(outs["triton"], outs["torch"])
        grouped = cutnmix(imgs, torch.arange(b, device=cuda_device), params, mean=MEAN, std=STD,
                          out_dtype=dtype, impl="triton", layout="grouped")[0]
        assert grouped.is_contiguous(memory_format=torch.channels_last)
        assert_views_equal(grouped, grouped_layout(ref))


@pytest.mark.parametrize("mode", MODES)
def test_triton_equals_torch_and_numpy_on_big_batches(cuda_device, mode):
    pytest.importorskip("triton")
    b = BIG_BATCH
    g = torch.Generator(device=cuda_device).manual_seed(3)
    params = draw_params(b, 3, 32, 32, mode=mode, generator=g, device=cuda_device)
    imgs = images(b, 32, 32, seed=3, device=cuda_device)
    expected = numpy_cutnmix(imgs.cpu(), torch.arange(b), params.to("cpu"), mean=MEAN, std=STD)[0]
    assert_views_equal(_views(imgs, params, "triton", torch.float32), expected.to(cuda_device))
    assert_views_equal(_views(imgs, params, "torch", torch.float32), expected.to(cuda_device))
    for dtype in (torch.bfloat16, torch.float16):  # both round to nearest even on CUDA: 0 ulp
        assert_views_equal(_views(imgs, params, "triton", dtype), _views(imgs, params, "torch", dtype))


def test_auto_uses_triton_and_never_syncs(cuda_device):
    pytest.importorskip("triton")
    assert resolve_impl("auto", cuda_device) == "triton"
    aug = CutNMix(peers=3, out_dtype=torch.bfloat16)
    imgs = images(256, 32, 32, device=cuda_device)
    labels = torch.arange(256, device=cuda_device)
    g = torch.Generator(device=cuda_device).manual_seed(0)
    aug(imgs, labels, generator=g)  # warm-up: compile the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views, y_a, y_b, lam = aug(imgs, labels, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert views.device == imgs.device and views.shape == (3, 256, 3, 32, 32)
    assert all(views[k].is_contiguous(memory_format=torch.channels_last) for k in range(3))
    assert y_b.device == imgs.device and lam.device == imgs.device


def test_same_cuda_seed_same_views(cuda_device):
    pytest.importorskip("triton")
    aug = CutNMix(peers=3)
    imgs = images(64, 32, 32, device=cuda_device)
    labels = torch.arange(64, device=cuda_device)
    a = aug(imgs, labels, generator=torch.Generator(device=cuda_device).manual_seed(7))[0]
    b = aug(imgs, labels, generator=torch.Generator(device=cuda_device).manual_seed(7))[0]
    assert torch.equal(a, b)


def test_torch_path_on_cuda_never_syncs(cuda_device):
    aug = CutNMix(peers=3, out_dtype=torch.bfloat16, impl="torch")
    imgs = images(128, 32, 32, device=cuda_device)
    labels = torch.arange(128, device=cuda_device)
    g = torch.Generator(device=cuda_device).manual_seed(0)
    for mode in MODES:
        aug.mode = mode
        aug(imgs, labels, generator=g)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            views = aug(imgs, labels, generator=g)[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert views.device == imgs.device
