"""The loaders on a CUDA device (`pytest -m gpu`; skipped without CUDA).

ffcv and DALI may be absent on the GPU box: their cases skip through pytest.importorskip.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.loaders import make_loader
from pipeline.loaders.base import augment_seed, make_plan
from tests.pipeline.loaders.conftest import TRAIN_N, collect, label_of

pytestmark = pytest.mark.gpu

B = 32
SEED = 4


def expected(epoch, n=TRAIN_N, batch_size=B):
    return make_plan(n, split="train", batch_size=batch_size, seed=SEED, rank=0, world=1, drop_last=None).indices(epoch)


def check_raw_batch(images, labels, batch=B):
    assert images.device.type == labels.device.type == "cuda"
    assert images.dtype == torch.uint8 and images.shape == (batch, 32, 32, 3)
    assert labels.dtype == torch.int64 and labels.shape == (batch,)


@pytest.mark.parametrize("name,options", [("resident", {}), ("cpu", {"num_workers": 2}), ("dali", {}),
                                          ("ffcv", {"order": "shared"})])
def test_loader_on_cuda_yields_the_shared_order_on_the_device(name, options, prepared, cuda_device):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    if name == "ffcv":
        pytest.importorskip("ffcv")
    with make_loader(name, prepared, batch_size=B, seed=SEED, device=cuda_device, **options) as loader:
        ids, labels, sizes, (images, y) = collect(loader, epoch=2)
        check_raw_batch(images, y)
        assert torch.equal(ids, expected(2)) and set(sizes) == {B}
        assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))


def test_resident_split_lives_on_the_device_and_needs_no_host_sync(prepared, cuda_device):
    with make_loader("resident", prepared, batch_size=B, seed=SEED, device=cuda_device) as loader:
        assert loader.images.device.type == "cuda" and loader.labels.device.type == "cuda"
        loader.set_epoch(1)
        it = iter(loader)
        first = next(it)  # the epoch's one permutation upload happens here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host<->device sync below raises
        try:
            rest = [tuple(t.clone() for t in batch) for batch in it]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(rest) == len(loader) - 1
        check_raw_batch(*first)


def test_resident_augment_on_cuda_equals_the_op_with_the_device_generator(prepared, cuda_device):
    from pipeline.ops import CutNMix

    aug = CutNMix(peers=3, out_dtype=torch.bfloat16)
    with make_loader("resident", prepared, batch_size=B, seed=SEED, device=cuda_device) as raw_loader:
        raw_loader.set_epoch(3)
        raw = [(x.clone(), y.clone()) for x, y in raw_loader]
    with make_loader("resident", prepared, batch_size=B, seed=SEED, device=cuda_device, augment=aug) as loader:
        loader.set_epoch(3)
        for step, ((x, y), (views, y_a, y_b, lam)) in enumerate(zip(raw, loader)):
            assert views.device.type == "cuda" and views.shape == (3, B, 3, 32, 32) and views.dtype == torch.bfloat16
            assert all(views[k].is_contiguous(memory_format=torch.channels_last) for k in range(3))
            g = torch.Generator(device=cuda_device).manual_seed(augment_seed(SEED, 3, 0, step))
            for a, b in zip((views, y_a, y_b, lam), aug(x, y, generator=g)):
                assert torch.equal(a, b), step


def test_cpu_baseline_delivers_augmented_views_to_cuda(prepared, cuda_device):
    from pipeline.ops import CutNMix

    aug = CutNMix(peers=2, out_dtype=torch.bfloat16)
    with make_loader("cpu", prepared, batch_size=B, seed=SEED, device=cuda_device, augment=aug,
                     num_workers=2) as loader:
        assert loader.dataloader.pin_memory
        views, y_a, _y_b, lam = next(iter(loader))
    assert views.device.type == y_a.device.type == lam.device.type == "cuda"
    assert views.shape == (2, B, 3, 32, 32) and views.dtype == torch.bfloat16


def test_dali_native_augment_on_cuda_matches_the_cpu_result(prepared, cuda_device):
    pytest.importorskip("nvidia.dali")
    from pipeline.ops import CutNMix

    aug = CutNMix(peers=3, out_dtype=torch.float32, impl="torch")
    with make_loader("resident", prepared, batch_size=B, seed=SEED, augment=aug) as cpu_loader:
        want = [tuple(t.clone() for t in out) for out in cpu_loader]
    with make_loader("dali", prepared, batch_size=B, seed=SEED, device=cuda_device, augment=aug,
                     native_augment=True) as loader:
        got = [tuple(t.clone() for t in out) for out in loader]
    assert len(got) == len(want)
    for (views, y_a, y_b, lam), (w_views, w_a, w_b, w_lam) in zip(got, want):
        assert views.device.type == "cuda"
        assert torch.equal(y_a.cpu(), w_a) and torch.equal(y_b.cpu(), w_b) and torch.equal(lam.cpu(), w_lam)
        # DALI's GPU arithmetic may contract into FMAs: within a float32 ulp of the CPU result
        torch.testing.assert_close(views.cpu(), w_views, rtol=1e-6, atol=1e-5)
