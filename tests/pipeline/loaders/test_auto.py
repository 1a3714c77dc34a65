"""make_loader("auto"): the choice rules (pure) and the CPU pick."""

from __future__ import annotations

import pytest
import torch

from pipeline.loaders import RESIDENT_MAX_FRACTION, auto_rule, choose_auto, make_loader

GIB = 2**30
CIFAR = 50_000 * (32 * 32 * 3 + 8)


def test_auto_on_cpu_is_the_resident_loader(prepared):
    name, reason = choose_auto(prepared, "train", "cpu")
    assert name == "resident" and "fastest" in reason
    # backend-specific options of loaders it did not pick are dropped, not errors
    with make_loader("auto", prepared, batch_size=16, num_workers=2, order="shared") as loader:
        assert loader.name == "resident" and len(loader) == 250 // 16


@pytest.mark.parametrize(
    "need,free,dali,ffcv,want",
    [
        (CIFAR, 40 * GIB, True, True, "resident"),  # 150 MiB on a 40 GiB GPU
        (CIFAR, int(CIFAR / RESIDENT_MAX_FRACTION), False, False, "resident"),  # exactly at the limit
        (CIFAR, int(CIFAR / RESIDENT_MAX_FRACTION) - 1, True, True, "dali"),
        (CIFAR, 100 * 2**20, False, True, "ffcv"),
        (CIFAR, 100 * 2**20, False, False, "cpu"),
    ],
)
def test_auto_rule_on_cuda(need, free, dali, ffcv, want):
    name, reason = auto_rule("cuda", need, free, dali, ffcv)
    assert name == want and "\n" not in reason and "MiB" in reason


def test_auto_rule_on_cpu_ignores_memory_and_backends():
    assert auto_rule("cpu", CIFAR, 0, True, True)[0] == "resident"


def test_auto_rule_asks_for_backends_only_when_it_needs_them():
    """Checking a back-end imports it (ffcv: seconds of numba compilation): the rule must not
    when the split is resident, and must when it is not."""
    asked = []

    def probe(name, answer):
        return lambda: asked.append(name) or answer

    assert auto_rule("cpu", CIFAR, 0, probe("dali", True), probe("ffcv", True))[0] == "resident"
    assert auto_rule("cuda", CIFAR, 40 * GIB, probe("dali", True), probe("ffcv", True))[0] == "resident"
    assert asked == []
    assert auto_rule("cuda", CIFAR, 2**20, probe("dali", False), probe("ffcv", True))[0] == "ffcv"
    assert asked == ["dali", "ffcv"]


@pytest.mark.gpu
def test_auto_on_cuda_picks_resident_for_a_small_split(prepared, cuda_device):
    with make_loader("auto", prepared, batch_size=16, device=cuda_device) as loader:
        assert loader.name == "resident" and loader.images.device.type == "cuda"
        images, labels = next(iter(loader))
        assert images.device.type == labels.device.type == "cuda"
        assert torch.cuda.mem_get_info(cuda_device)[0] > 0
