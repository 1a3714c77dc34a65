"""Every loader against the batch contract on the CPU (issue 4's test list).

Loaders under test: resident, cpu (2 workers), dali (CPU pipeline), ffcv with the shared order
and ffcv with its native order. The shared-order loaders must yield exactly the batches that
`EpochPlan.indices` defines; ffcv's native order is checked against FFCV's documented
formula instead. FFCV compiles its pipeline per Loader (about a second), so the ffcv cases reuse
module-scoped loaders where they can.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import CnmError
from pipeline.loaders import make_loader
from pipeline.loaders.base import derive_seed, epoch_permutation, make_plan
from tests.pipeline.loaders.conftest import (
    TEST_N,
    TINY_TEST_N,
    TINY_TRAIN_N,
    TRAIN_N,
    collect,
    label_of,
)

B = 32
SPECS = {
    "resident": ("resident", {}),
    "cpu": ("cpu", {"num_workers": 2}),
    "dali": ("dali", {}),
    "ffcv-shared": ("ffcv", {"order": "shared"}),
    "ffcv": ("ffcv", {}),
}
SHARED = ["resident", "cpu", "dali", "ffcv-shared"]  # loaders that read the shared (seed, epoch) order
BACKEND = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def build(spec: str, data, **kwargs):
    name, options = SPECS[spec]
    if name in BACKEND:
        pytest.importorskip(BACKEND[name])
    return make_loader(name, data, **{**options, **kwargs})


def expected_ids(spec: str, epoch: int, *, n=TRAIN_N, batch_size=B, seed=0, rank=0, world=1) -> torch.Tensor:
    """What the loader must yield in `epoch` (train split, default drop_last)."""
    if spec == "ffcv":  # FFCV's own RANDOM order: np.random.default_rng(s + epoch).permutation(n)
        s = derive_seed("ffcv", seed) % 2**31
        order = np.random.default_rng(s + epoch).permutation(n)
        return torch.from_numpy(order[: n // batch_size * batch_size].astype(np.int64))
    plan = make_plan(n, split="train", batch_size=batch_size, seed=seed, rank=rank, world=world, drop_last=None)
    return plan.indices(epoch)


@pytest.fixture(scope="module", params=list(SPECS))
def train_loader(request, prepared):
    loader = build(request.param, prepared, batch_size=B, seed=0)
    loader.spec = request.param
    yield loader
    loader.close()


def test_one_epoch_yields_every_sample_once_with_its_label(train_loader):
    ids, labels, sizes, (images, y) = collect(train_loader, epoch=0)
    assert len(train_loader) == TRAIN_N // B == len(sizes) and set(sizes) == {B}
    assert train_loader.num_samples == len(ids) == TRAIN_N // B * B
    assert len(set(ids.tolist())) == len(ids) and ids.max() < TRAIN_N  # each sample at most once
    assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))  # its own label
    assert images.dtype == torch.uint8 and images.shape == (B, 32, 32, 3) and images.device.type == "cpu"
    assert y.dtype == torch.int64 and y.shape == (B,) and y.device.type == "cpu"
    assert train_loader.name == SPECS[train_loader.spec][0]


def test_epochs_reshuffle_from_seed_and_epoch(train_loader):
    e0 = collect(train_loader, epoch=0)[0]
    e1 = collect(train_loader, epoch=1)[0]
    auto = collect(train_loader)[0]  # no set_epoch: the epoch after the previous one
    assert train_loader.epoch == 2
    e2 = collect(train_loader, epoch=2)[0]
    again = collect(train_loader, epoch=0)[0]
    assert not torch.equal(e0, e1) and not torch.equal(e1, e2)
    assert torch.equal(auto, e2) and torch.equal(again, e0)
    for epoch, got in ((0, e0), (1, e1), (2, e2)):  # the documented order, hence reproducible
        assert torch.equal(got, expected_ids(train_loader.spec, epoch))


def test_an_unfinished_epoch_does_not_disturb_the_next(train_loader):
    train_loader.set_epoch(4)
    for step, _ in enumerate(train_loader):
        if step == 1:
            break
    assert torch.equal(collect(train_loader, epoch=5)[0], expected_ids(train_loader.spec, 5))
    assert torch.equal(collect(train_loader)[0], expected_ids(train_loader.spec, 6))


def test_shared_order_loaders_agree_with_each_other(prepared):
    orders = {}
    for spec in SHARED:
        name = SPECS[spec][0]
        if name in BACKEND and not _installed(BACKEND[name]):
            continue
        with build(spec, prepared, batch_size=50, seed=11, drop_last=False) as loader:
            orders[spec] = collect(loader, epoch=3)[0]
    ref = orders.pop("resident")
    assert sorted(ref.tolist()) == list(range(TRAIN_N))
    for spec, got in orders.items():
        assert torch.equal(got, ref), spec


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("spec", SHARED)
def test_shards_partition_the_epoch(spec, world, prepared):
    if spec == "ffcv-shared" and world == 2:
        pytest.skip("the TraversalOrder only serves EpochPlan.indices; world=3 covers it (FFCV builds are slow)")
    shards = []
    for rank in range(world):
        with build(spec, prepared, batch_size=B, seed=5, rank=rank, world=world) as loader:
            ids, labels, sizes, _ = collect(loader, epoch=2)
            assert len(sizes) == len(loader) and set(sizes) == {B}
            assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))
            assert torch.equal(ids, expected_ids(spec, 2, seed=5, rank=rank, world=world))
            shards.append(ids)
    assert len({len(s) for s in shards}) == 1  # equal batch counts for DDP
    allids = torch.cat(shards).tolist()
    assert len(set(allids)) == len(allids) == world * ((TRAIN_N // world) // B * B)  # disjoint


@pytest.mark.parametrize("spec", ["resident", "dali"])
def test_shards_without_drop_last_cover_every_sample(spec, prepared):
    world = 3
    shards = []
    for rank in range(world):
        with build(spec, prepared, batch_size=B, rank=rank, world=world, drop_last=False) as loader:
            ids, _, sizes, _ = collect(loader, epoch=1)
            assert len(sizes) == len(loader) == math.ceil(math.ceil(TRAIN_N / world) / B)
            shards.append(ids)
    assert len({len(s) for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(range(TRAIN_N))


def test_ffcv_native_order_shards_through_torch_distributed(prepared, monkeypatch):
    pytest.importorskip("ffcv")
    import torch.distributed as dist

    world = 2
    with pytest.raises(CnmError, match="torch.distributed.*not initialised"):
        build("ffcv", prepared, batch_size=B, rank=0, world=world)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        with build("ffcv", prepared, batch_size=B, rank=rank, world=world) as loader:
            ids, labels, sizes, _ = collect(loader, epoch=1)
            assert len(sizes) == len(loader) and set(sizes) == {B}
            assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))
            shards.append(ids)
    assert len(shards[0]) == len(shards[1]) == (TRAIN_N // world) // B * B
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("spec", list(SPECS))
def test_test_split_is_complete_and_in_order(spec, world, prepared):
    if (spec, world) in (("ffcv-shared", 3), ("ffcv", 1)):
        pytest.skip("same FFCV code path as the other world size; FFCV builds are slow")
    parts = []
    for rank in range(world):
        with build(spec, prepared, split="test", batch_size=B, rank=rank, world=world) as loader:
            ids, labels, sizes, _ = collect(loader, epoch=3)
            assert len(sizes) == len(loader) and sum(sizes) == loader.num_samples
            assert all(s == B for s in sizes[:-1])
            assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))
            parts.append(ids)
    assert torch.equal(torch.cat(parts), torch.arange(TEST_N))


# ffcv-shared batches exactly like native ffcv (the order object differs only): left out to save
# two FFCV compilations.
SMALL = ["resident", "cpu", "dali", "ffcv"]


@pytest.mark.parametrize("spec", SMALL)
def test_dataset_smaller_than_one_batch(spec, tiny):
    with build(spec, tiny, batch_size=8, seed=1) as loader:  # train, drop_last=None
        ids, labels, sizes, _ = collect(loader, epoch=0)
        assert sizes == [TINY_TRAIN_N] == [loader.num_samples] and len(loader) == 1
        assert sorted(ids.tolist()) == list(range(TINY_TRAIN_N))
        assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))
    with pytest.raises(CnmError, match="drop_last=True"):
        build(spec, tiny, batch_size=8, drop_last=True)
    with build(spec, tiny, split="test", batch_size=8) as loader:
        ids, _, sizes, _ = collect(loader)
        assert sizes == [TINY_TEST_N] and torch.equal(ids, torch.arange(TINY_TEST_N))


@pytest.mark.parametrize("spec", SMALL)
def test_batch_size_one(spec, tiny):
    with build(spec, tiny, batch_size=1, seed=2) as loader:
        ids, labels, sizes, (images, y) = collect(loader, epoch=1)
        assert sizes == [1] * TINY_TRAIN_N == [1] * len(loader)
        assert sorted(ids.tolist()) == list(range(TINY_TRAIN_N))
        assert images.shape == (1, 32, 32, 3) and y.shape == (1,) and y.dtype == torch.int64
        assert torch.equal(labels, torch.from_numpy(label_of(ids.numpy())))


def test_cpu_loader_output_does_not_depend_on_worker_count(prepared):
    runs = []
    for workers in (0, 1, 2):
        with make_loader("cpu", prepared, batch_size=B, seed=3, num_workers=workers) as loader:
            runs.append(collect(loader, epoch=1)[0])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def _installed(name: str) -> bool:
    from pipeline import backends

    return backends.available(name)


@pytest.mark.parametrize("name", ["resident", "cpu"])
def test_limit_reads_only_the_first_samples(name, prepared):
    """`limit=N` (--limit-train): the epoch is a shuffled pass over the split's first N samples,
    in the same order on both loaders; a loader that cannot be limited says so in one line."""
    opts = {"num_workers": 0} if name == "cpu" else {}
    loader = make_loader(name, prepared, batch_size=16, limit=100, **opts)
    ids, labels, sizes, _ = collect(loader, epoch=1)
    loader.close()
    assert len(loader) == 6 and loader.num_samples == 96 and set(sizes) == {16}
    assert ids.unique().numel() == 96 and int(ids.max()) < 100
    assert torch.equal(labels, torch.as_tensor(label_of(ids.numpy())))
    assert torch.equal(ids, epoch_permutation(100, 0, 1)[:96])


def test_limit_refused_by_loaders_that_read_the_whole_split(prepared, monkeypatch):
    from pipeline import loaders

    monkeypatch.setattr(loaders, "loader_class", lambda name: type("Whole", (), {"can_limit": False}))
    with pytest.raises(CnmError, match="reads its whole split") as e:
        make_loader("dali", prepared, limit=10)
    assert "\n" not in str(e.value)
