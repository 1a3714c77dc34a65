"""Multi-process training on the CPU with gloo (issue 7): 2 processes, tiny models and data.

Two kinds of test, each start of a process costing seconds on a small machine:
- one `torch.multiprocessing` spawn of 2 ranks that runs many checks of trainer.distributed
  (collectives, gradient averaging, synchronised BN against plain BN on the whole batch, loader
  sharding, evaluation over the whole test split, a bounded collective timeout);
- `python -m torch.distributed.run --nproc-per-node 2 -m cnm train ...` runs of the real CLI.
"""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
import torch

from pipeline.errors import CnmError
from trainer import distributed as D

WORLD = 2
NUM_CLASSES = 4


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def index_dataset(out, train: int, test: int):
    """A prepared dir whose images encode their index: pixel (0,0) = (i % 256, i // 256, split)."""
    from pipeline.data.manifest import write_dataset

    rng = np.random.default_rng(0)
    splits = {}
    for k, (split, n) in enumerate((("train", train), ("test", test))):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        idx = np.arange(n)
        images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = idx % 256, idx // 256, k
        splits[split] = (images, rng.integers(0, NUM_CLASSES, n))
    write_dataset(out, splits, dataset="synthetic", class_names=[f"c{i}" for i in range(NUM_CLASSES)],
                  beton=False)
    return out


def decode_index(images: torch.Tensor) -> list[int]:
    px = images[:, 0, 0].to(torch.int64)
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def spawn(fn, *args, world: int = WORLD) -> None:
    """Run fn(rank, port, *args) in `world` fresh processes; a failing rank fails the test."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(free_port(), *args), nprocs=world, join=True, start_method="spawn")


def _join(rank: int, port: int, timeout_s: float = 60.0) -> D.Comm:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return D.init_from_env("cpu", timeout_s=timeout_s)


def gather(comm: D.Comm, t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(comm.world)]
    dist.all_gather(out, t.contiguous())
    return out


# ----------------------------------------------------------------------------- single process


def test_launch_env_parsing_and_errors():
    assert D.launch_env({}) is None
    env = dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29500")
    assert D.launch_env(env) == D.LaunchEnv(1, 4, 1, "node0", 29500)
    with pytest.raises(CnmError, match="MASTER_ADDR, MASTER_PORT not set"):
        D.launch_env(dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"))
    with pytest.raises(CnmError, match="must be integers"):
        D.launch_env({**env, "RANK": "x"})
    with pytest.raises(CnmError, match="0 <= RANK < WORLD_SIZE"):
        D.launch_env({**env, "RANK": "4"})
    # not launched, or a world of one: the single-process communicator, no process group
    comm = D.init_from_env("cpu", environ={})
    assert type(comm) is D.Comm and comm.is_main and comm.world == 1 and not comm.distributed
    assert type(D.init_from_env("cpu", environ={**env, "RANK": "0", "WORLD_SIZE": "1"})) is D.Comm
    t = torch.arange(3.0)
    assert comm.all_reduce_sum(t) is t and comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.grad_all_reduce([torch.nn.Parameter(t)]) is None
    with pytest.raises(CnmError, match="--dist-timeout must be > 0"):
        D.init_from_env("cpu", timeout_s=0, environ={})


def test_fault_injector_spec():
    assert D.FaultInjector.from_env(0, {}) is None
    assert D.FaultInjector.from_env(0, {D.FAULT_ENV: "1:2:3"}) is None          # another rank
    f = D.FaultInjector.from_env(1, {D.FAULT_ENV: "1:2:3"})
    assert (f.epoch, f.step, f.kind) == (2, 3, "raise")
    f.check(0, 2)                                                              # not yet
    with pytest.raises(RuntimeError, match="injected failure at rank 1, epoch 2, step 3"):
        f.check(1, 2)
    assert D.FaultInjector.from_env(1, {D.FAULT_ENV: "1:1:1:hang"}).kind == "hang"
    for bad in ("1:2", "a:1:1", "1:1:1:explode"):
        with pytest.raises(CnmError, match="expected RANK:EPOCH:STEP"):
            D.FaultInjector.from_env(1, {D.FAULT_ENV: bad})


def test_group_that_cannot_form_fails_with_one_line_within_the_timeout():
    """WORLD_SIZE=2 but the second process never comes: a clear error after the timeout."""
    import subprocess
    import time

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": os.getcwd()}
    code = ("from trainer.distributed import init_from_env\n"
            "from pipeline.errors import CnmError\n"
            "try:\n    init_from_env('cpu', timeout_s=2)\n"
            "except CnmError as e:\n    print('CNMERROR', e)\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    line = [l for l in out.stdout.splitlines() if l.startswith("CNMERROR")]
    assert line, out.stdout + out.stderr
    assert "rank 0: could not form the process group of 2 processes at 127.0.0.1" in line[0]
    assert elapsed < 30


# ----------------------------------------------------------------------------- 2 ranks, spawned


def _collectives_worker(rank: int, port: int, data_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn as nn

    comm = _join(rank, port)
    assert isinstance(comm, D.ProcessGroupComm) and comm.rank == rank and comm.world == WORLD
    assert comm.is_main == (rank == 0) and comm.backend == "gloo"
    assert comm.device("cpu") == torch.device("cpu")

    # -- objects, errors seen by one rank only, rank-0-only work
    assert comm.broadcast_object({"run": f"from-{rank}"}) == {"run": "from-0"}
    comm.agree(None)
    try:
        comm.agree("data dir missing" if rank == 1 else None)
        raise AssertionError("agree did not raise")
    except CnmError as e:
        assert str(e) == "rank 1: data dir missing"
    try:
        comm.on_main(lambda: (_ for _ in ()).throw(CnmError("no last.pt")))
        raise AssertionError("on_main did not raise")
    except CnmError as e:
        assert str(e) == "no last.pt"
    assert comm.on_main(lambda: rank + 10) == 10

    # -- rank 0's parameters and buffers everywhere (channels-last and int buffers included)
    torch.manual_seed(rank)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    net[1].num_batches_tracked.fill_(rank + 5)
    comm.sync_module(net)
    for t in list(net.parameters()) + list(net.buffers()):
        a, b = gather(comm, t.detach())
        assert torch.equal(a, b)
    assert net[1].num_batches_tracked.item() == 5 and net[0].weight.is_contiguous(memory_format=torch.channels_last)

    # -- gradient averaging = the mean of the ranks' gradients, bitwise equal on every rank
    w = nn.Parameter(torch.zeros(2, 3, 2, 2).to(memory_format=torch.channels_last))
    v = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    unused = nn.Parameter(torch.zeros(2))
    g_w = torch.arange(24.0).view(2, 3, 2, 2) * (rank + 1)
    w.grad = g_w.to(memory_format=torch.channels_last)
    v.grad = torch.full((5,), float(rank), dtype=torch.float64)
    reducer = comm.grad_all_reduce([w, v, unused])
    assert len(reducer.flats) == 2                       # one flat buffer per dtype
    reducer()
    assert torch.equal(w.grad, torch.arange(24.0).view(2, 3, 2, 2) * 1.5)
    assert torch.equal(v.grad, torch.full((5,), 0.5, dtype=torch.float64))
    assert torch.equal(unused.grad, torch.zeros(2))     # a missing gradient counts as zeros

    # -- synchronised BN (reference) == BatchNorm2d on the concatenated batch
    torch.manual_seed(100)                               # same full batch on both ranks
    x_full = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 3 + 1
    c_full = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    sync = D.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3).double()), "cpu")
    assert isinstance(sync[0], D.ReferenceSyncBatchNorm)
    sync[0].load_state_dict(ref.state_dict())
    x_ref = x_full.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * c_full).sum().backward()
    lo, hi = (0, 2) if rank == 0 else (2, 6)             # unequal shards: 2 and 4 samples
    x = x_full[lo:hi].clone().requires_grad_()
    y = sync(x)
    (y * c_full[lo:hi]).sum().backward()                 # L_r; the total loss is sum_r L_r
    torch.testing.assert_close(y, y_ref[lo:hi].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad[lo:hi], rtol=1e-10, atol=1e-10)
    gw = comm.all_reduce_sum(sync[0].weight.grad.clone())
    gb = comm.all_reduce_sum(sync[0].bias.grad.clone())
    torch.testing.assert_close(gw, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, ref.bias.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sync[0].running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sync[0].running_var, ref.running_var, rtol=1e-10, atol=1e-12)
    sync.eval()
    torch.testing.assert_close(sync(x_full), ref.eval()(x_full))        # eval: plain BN

    # -- the loaders' sharding: every training sample exactly once per epoch across ranks,
    #    the same number of batches on every rank, a new order every epoch
    from pipeline.loaders import make_loader

    loader = make_loader("resident", data_dir, split="train", batch_size=8, device="cpu", seed=3,
                         rank=rank, world=WORLD)
    n_train = loader.manifest.counts["train"]
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        mine = [i for images, _ in loader for i in decode_index(images)]
        counts = comm.all_reduce_sum(torch.bincount(torch.tensor(mine), minlength=n_train))
        assert counts.tolist() == [1] * n_train, counts           # a partition of the epoch
        sizes = comm.all_reduce_sum(torch.tensor([len(loader), 0]) + torch.tensor([0, 1]))
        assert sizes[0].item() == WORLD * len(loader)
        orders.append(mine)
    assert orders[0] != orders[1]

    # -- evaluation over the whole test split: every rank scores its shard, counts are summed;
    #    the result equals a single-process evaluation of the same models
    from pipeline.data.manifest import load_manifest
    from trainer.evaluate import Evaluator
    from trainer.peers import build_peers

    man = load_manifest(data_dir)
    torch.manual_seed(0)
    peers = build_peers(["resnet20", "resnet20"], man.num_classes, peer_exec="loop")
    images, labels = man.load_split("test")
    sharded = Evaluator(images, labels, mean=man.mean, std=man.std, rank=rank, world=WORLD,
                        reduce=comm.all_reduce_sum)(peers, peers)
    whole = Evaluator(images, labels, mean=man.mean, std=man.std)(peers, peers)
    assert sharded["test_images"] == whole["test_images"] == man.counts["test"]
    for key in ("test_acc", "ensemble_acc", "teacher_acc", "teacher_ensemble_acc"):
        assert sharded[key] == pytest.approx(whole[key], abs=1e-9), key

    # -- a rank that stops answering: the others fail within the group's timeout, one line
    import time

    short = D.ProcessGroupComm(rank, WORLD, rank, "gloo", "cpu", timeout_s=1.5,
                               group=dist.new_group(backend="gloo",
                                                    timeout=__import__("datetime").timedelta(seconds=1.5)))
    if rank == 0:
        t0 = time.perf_counter()
        try:
            short.all_reduce_sum(torch.ones(1))
            raise AssertionError("the collective did not time out")
        except CnmError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith("rank 0: all-reduce failed")
            assert "did not answer within 1.5 s (--dist-timeout)" in msg
        assert time.perf_counter() - t0 < 15
    comm.barrier()                                       # rank 1 never joined the short group's op
    comm.close()


def test_collectives_grad_sync_sync_bn_sharding_and_eval(tmp_path):
    data = index_dataset(tmp_path / "data", train=48, test=23)   # uneven test shards
    spawn(_collectives_worker, str(data))
