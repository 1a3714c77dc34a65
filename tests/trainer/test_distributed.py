"""Multi-process training on the CPU with gloo (issue 7): 2 processes, tiny models and data.

Two kinds of test, each start of a process costing seconds on a small machine:
- one `torch.multiprocessing` spawn of 2 ranks that runs many checks of trainer.distributed
  (collectives, gradient averaging, synchronised BN against plain BN on the whole batch, loader
  sharding, evaluation over the whole test split, a bounded collective timeout);
- `python -m torch.distributed.run --nproc-per-node 2 -m cnm train ...` runs of the real CLI.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trainer.evaluate as E
import trainer.loop as L
import trainer.step as S
from pipeline.data.manifest import load_manifest, write_dataset
from pipeline.errors import CnmError
from pipeline.loaders import make_loader
from trainer import checkpoint as ckpt
from trainer import distributed as D
from trainer.config import make_config, resolve
from trainer.distributed import launch
from trainer.evaluate import Evaluator
from trainer.loop import train
from trainer.peers import build_peers

WORLD = 2
NUM_CLASSES = 4


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def index_dataset(out, train: int, test: int):
    """A prepared dir whose images encode their index: pixel (0,0) = (i % 256, i // 256, split)."""
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
    mp.start_processes(fn, args=(free_port(), *args), nprocs=world, join=True, start_method="spawn")


def _join(rank: int, port: int, timeout_s: float = 60.0) -> D.Comm:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return D.init_from_env("cpu", timeout_s=timeout_s)


def gather(comm: D.Comm, t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(comm.world)]
    dist.all_gather(out, t.contiguous())
    return out


# ----------------------------------------------------------------------------- single process


def test_launch_env_parsing_and_errors():
    assert D.launch_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert D.launch_env(env) == D.LaunchEnv(1, 4, 1, "node0", 29500)
    with pytest.raises(CnmError, match="MASTER_ADDR, MASTER_PORT not set"):
        D.launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(CnmError, match="must be integers"):
        D.launch_env({**env, "RANK": "x"})
    with pytest.raises(CnmError, match="0 <= RANK < WORLD_SIZE"):
        D.launch_env({**env, "RANK": "4"})
    # not launched, or a world of one: the single-process communicator, no process group
    comm = D.init_from_env("cpu", environ={})
    assert type(comm) is D.Comm and comm.is_main and comm.world == 1
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


class _Work:
    """A stand-in for torch's `Work`: completes after `polls` calls of is_completed (never: None),
    then `wait()` raises `error` if given."""

    def __init__(self, polls=None, error=None):
        self.polls, self.error, self.calls = polls, error, 0

    def is_completed(self):
        self.calls += 1
        return self.polls is not None and self.calls > self.polls

    def wait(self):
        if self.error is not None:
            raise self.error


def test_bounded_wait_polls_until_done_and_turns_a_hang_or_failure_into_one_line():
    """The wait every per-epoch collective goes through (NCCL's `wait()` does not block the host
    and a hung NCCL collective never raises, so the comm polls `is_completed()` itself)."""
    comm = D.ProcessGroupComm(0, 2, 0, timeout_s=0.2)
    started = []

    def collective(work):
        def start(*args, group, async_op):
            assert async_op and group is None
            started.append(args)
            return work
        return start

    done = _Work(polls=3)
    comm._run("all-reduce", collective(done), "t")
    assert started == [("t",)] and done.calls == 4          # polled until it completed
    t0 = time.perf_counter()
    with pytest.raises(CnmError) as e:
        comm._run("checking the data", collective(_Work(polls=None)))
    assert time.perf_counter() - t0 >= 0.2
    assert str(e.value) == ("rank 0: checking the data failed (no reply); another process stopped (see its "
                            "output) or did not answer within 0.2 s (--dist-timeout)")
    failed = _Work(polls=0, error=dist.DistBackendError("NCCL error in: x.cpp:1, remote process exited\nmore"))
    with pytest.raises(CnmError, match=r"^rank 0: broadcast failed \(DistBackendError: NCCL error in: x.cpp:1, "
                                       r"remote process exited\); another process stopped") as e:
        comm._run("broadcast", collective(failed))
    assert "\n" not in str(e.value)


def test_nccl_group_is_bound_to_its_device_and_outlives_the_bounded_wait(monkeypatch):
    """NCCL: `device_id=cuda:LOCAL_RANK` (where that device exists) and a group timeout longer
    than --dist-timeout, so the bounded wait reports before NCCL's watchdog aborts the process."""
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launch._form_group(D.LaunchEnv(1, 3, 1, "node0", 29500), cuda=True, timeout_s=8)
    launch._form_group(D.LaunchEnv(2, 3, 2, "node0", 29500), cuda=True, timeout_s=8)   # no cuda:2
    launch._form_group(D.LaunchEnv(1, 3, 1, "node0", 29500), cuda=False, timeout_s=8)
    nccl, missing, gloo = calls
    assert nccl["backend"] == "cpu:gloo,cuda:nccl" and nccl["device_id"] == torch.device("cuda", 1)
    assert nccl["timeout"] == datetime.timedelta(seconds=8 + launch.NCCL_WATCHDOG_MARGIN_S)
    assert missing["device_id"] is None           # comm.device("cuda") then says how many exist
    assert gloo["backend"] == "gloo" and gloo["device_id"] is None
    assert gloo["timeout"] == datetime.timedelta(seconds=8)


def test_group_that_cannot_form_fails_with_one_line_within_the_timeout(monkeypatch):
    """WORLD_SIZE=2 but the second process never comes: a clear error after the timeout, and
    no half-formed group is left behind."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    with pytest.raises(CnmError) as e:
        D.init_from_env("cpu", timeout_s=1.5)
    assert time.perf_counter() - t0 < 20
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rank 0: could not form the process group of 2 processes "
                                              "at 127.0.0.1:")
    assert "within 1.5 s" in msg and not dist.is_initialized()


def test_sync_bn_turns_cuda_graphs_off_or_is_refused_with_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # resolve() only asks this
    cfg = make_config(None, {"device": "cuda", "sync_bn": True})
    assert resolve(cfg, world=1).cuda_graphs                            # one process: nothing to sync
    assert not resolve(cfg, world=2).cuda_graphs                        # auto -> off
    with pytest.raises(CnmError, match="--sync-bn cannot be used with --cuda-graphs on"):
        resolve(make_config(None, {"device": "cuda", "sync_bn": True, "cuda_graphs": "on"}), world=2)
    with pytest.raises(CnmError, match="--dist-timeout must be > 0"):
        make_config(None, {"dist_timeout": 0.0})


# ----------------------------------------------------------------------------- 2 ranks, spawned


def _check_collectives(comm: D.Comm, rank: int, data_dir: str) -> None:
    assert isinstance(comm, D.ProcessGroupComm) and comm.rank == rank and comm.world == WORLD
    assert comm.is_main == (rank == 0) and comm.backend == "gloo"
    assert comm.device("cpu") == torch.device("cpu") and comm.backend == "gloo"
    if not torch.cuda.is_available():
        try:
            comm.device("cuda")
            raise AssertionError("cuda accepted by a gloo-only group")
        except CnmError as e:
            assert "needs the NCCL back-end" in str(e)

    # -- objects, errors seen by one rank only, rank-0-only work
    assert comm.broadcast_object({"run": f"from-{rank}"}) == {"run": "from-0"}
    assert comm.all_reduce_sum(torch.full((2,), rank + 1.0), block=False).tolist() == [3.0, 3.0]   # CPU: waited
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
    assert comm.everywhere(lambda: rank + 20) == rank + 20

    def fails_on_rank_1():
        if rank == 1:
            raise CnmError("no CUDA here")
        return 1

    try:
        comm.everywhere(fails_on_rank_1, "choosing the device")
        raise AssertionError("everywhere did not raise")
    except CnmError as e:
        assert str(e) == "rank 1: no CUDA here"

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
    odd = nn.Parameter(torch.zeros(4, 3))
    g_w = torch.arange(24.0).view(2, 3, 2, 2) * (rank + 1)
    w.grad = g_w.to(memory_format=torch.channels_last)
    v.grad = torch.full((5,), float(rank), dtype=torch.float64)
    odd.grad = (torch.arange(12.0).view(3, 4) * (rank + 1)).t()      # not dense in any order
    reducer = comm.grad_all_reduce([w, v, unused, odd])
    assert len(reducer.flats) == 2                       # one flat buffer per dtype
    reducer()
    assert torch.equal(w.grad, torch.arange(24.0).view(2, 3, 2, 2) * 1.5)
    assert w.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(odd.grad, torch.arange(12.0).view(3, 4).t() * 1.5)
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
    man = load_manifest(data_dir)
    torch.manual_seed(0)
    peers = build_peers(["resnet20", "resnet20"], man.num_classes, peer_exec="loop")
    images, labels = man.load_split("test")
    sharded = Evaluator(images, labels, mean=man.mean, std=man.std, rank=rank, world=WORLD,
                        reduce=comm.all_reduce_sum)(peers, peers)
    whole = Evaluator(images, labels, mean=man.mean, std=man.std)(peers, peers)
    assert sharded["test_images"] == whole["test_images"] == man.counts["test"]
    for key in ("test_acc", "ensemble_acc", "teacher_acc", "teacher_ensemble_acc", "disagreement"):
        assert sharded[key] == pytest.approx(whole[key], abs=1e-9), key


GLOO_TIMEOUT_S = 6.0


def _check_timeout(comm: D.Comm, rank: int) -> None:
    """A rank that never joins a collective: the one waiting for it gets the one-line error of
    the bounded wait after the comm's timeout (1 s), not gloo's own (6 s): the path a hung NCCL
    collective takes. Receivers wait for broadcasts (a sender may finish alone), so rank 1 waits
    there and rank 0 elsewhere; each case in its own subgroup, whose stuck work gloo ends later."""
    cases = [("all-reduce", 0, lambda c: c.all_reduce_sum(torch.ones(1))),
             ("all-reduce", 0, lambda c: c.all_reduce_min(torch.ones(1))),
             ("checking the data", 0, lambda c: c.agree(None, "checking the data")),
             ("choosing the device", 0, lambda c: c.everywhere(lambda: 1, "choosing the device")),
             ("broadcast", 1, lambda c: c.broadcast_tensors([torch.ones(3)])),
             ("broadcast", 1, lambda c: c.broadcast_object({"a": 1})),
             ("preparing the run", 1, lambda c: c.on_main(lambda: 1, "preparing the run"))]
    groups = [dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
              for _ in cases]
    for (what, waiter, op), group in zip(cases, groups):
        if rank != waiter:
            continue
        short = D.ProcessGroupComm(rank, WORLD, rank, ("gloo",), timeout_s=1.0, group=group)
        t0 = time.perf_counter()
        try:
            op(short)
            raise AssertionError(f"{what}: the collective did not time out")
        except CnmError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"rank {rank}: {what} failed (no reply); "), msg
            assert msg.endswith("did not answer within 1 s (--dist-timeout)"), msg
        assert time.perf_counter() - t0 < GLOO_TIMEOUT_S
    comm.barrier()                                       # the other rank never joined those ops


# ----------------------------------------------------------------------------- the real loop


def _gather_equal(comm, tensors) -> bool:
    return all(torch.equal(*gather(comm, t.detach())) for t in tensors)


def _check_loop(comm: D.Comm, data_dir: str, other_data_dir: str, out_root: str) -> None:
    """Two runs of trainer.loop.train on 2 ranks; checks at every epoch end:
    - before the end-of-epoch buffer broadcast (`read_metrics`): parameters and EMA parameters
      identical (averaged gradients), BatchNorm running statistics per rank (different), or
      identical with --sync-bn;
    - at evaluation: everything identical (parameters, buffers, EMA teacher)."""
    log = []
    real_read, real_eval = S.TrainStep.read_metrics, E.Evaluator.__call__

    def read_metrics(self, *a, **k):
        peers, ema = self.peerset, self.teacher.module
        log.append(("read", _gather_equal(comm, peers.parameters()), _gather_equal(comm, ema.parameters()),
                    _gather_equal(comm, [b for b in peers.buffers() if b.is_floating_point()]),
                    any(isinstance(m, D.ReferenceSyncBatchNorm) for m in peers.modules())))
        return real_read(self, *a, **k)

    def evaluate(self, peerset, teacher=None):
        log.append(("eval", _gather_equal(comm, list(peerset.state_dict().values())),
                    _gather_equal(comm, list(teacher.state_dict().values()))))
        return real_eval(self, peerset, teacher)

    S.TrainStep.read_metrics, E.Evaluator.__call__ = read_metrics, evaluate
    base = {"data": data_dir, "arch": "resnet20", "peers": 2, "batch_size": 8, "limit_train": 32,
            "quiet": True, "device": "cpu", "loader": "resident"}
    train(make_config(None, dict(base, out=f"{out_root}/run", epochs=2)), comm=comm)
    assert log == [("read", True, True, False, False), ("eval", True, True)] * 2, log
    log.clear()
    train(make_config(None, dict(base, out=f"{out_root}/syncbn", epochs=1, sync_bn=True)), comm=comm)
    assert log == [("read", True, True, True, True), ("eval", True, True)], log
    S.TrainStep.read_metrics, E.Evaluator.__call__ = real_read, real_eval
    # every rank runs rank 0's settings; ranks whose --data directory holds different files
    # (rank 1's is swapped here) stop together, with one line naming the odd rank, before
    # anything is written
    real_check = L._check_data
    if comm.rank == 1:
        L._check_data = lambda cfg: load_manifest(other_data_dir)
    try:
        train(make_config(None, dict(base, out=f"{out_root}/mixed", epochs=1)), comm=comm)
        raise AssertionError("different data accepted")
    except CnmError as e:
        assert str(e).startswith("rank 1: its data ") and "differ from rank 0's" in str(e), str(e)
    L._check_data = real_check


def _worker(rank: int, port: int, data_dir: str, other_data_dir: str, out_root: str) -> None:
    comm = _join(rank, port)
    _check_collectives(comm, rank, data_dir)
    _check_loop(comm, data_dir, other_data_dir, out_root)
    _check_timeout(comm, rank)                           # last: it leaves a broken subgroup
    comm.close()


def test_two_spawned_ranks(tmp_path):
    """One spawn of 2 ranks (each start costs seconds) for: collectives and their errors,
    gradient averaging, synchronised BN == BN on the whole batch, every training sample once
    per epoch across ranks, test accuracy over the whole test split, two real training runs
    with identical ranks (parameters, EMA, buffers), only rank 0 writing, a bounded timeout."""
    data = index_dataset(tmp_path / "data", train=48, test=23)   # uneven test shards
    other = index_dataset(tmp_path / "other", train=44, test=23)
    spawn(_worker, str(data), str(other), str(tmp_path))
    assert not (tmp_path / "mixed").exists()
    run = tmp_path / "run"
    # only rank 0 wrote: one row per epoch (two writers would have appended each row twice)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.json", "last.pt",
                                                     "metrics.jsonl", "prev.pt"]
    rows = ckpt.read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["global_step"] for r in rows] == [2, 4]
    resolved = json.loads((run / "config.json").read_text())["_resolved"]
    assert (resolved["world"], resolved["backend"], resolved["train_images"]) == (2, "gloo", 32)
    state = ckpt.load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["global_step"], state["world"]) == (2, 4, 2)
    assert json.loads((tmp_path / "syncbn" / "config.json").read_text())["sync_bn"] is True


# ----------------------------------------------------------------------------- torchrun, the CLI


def torchrun(args, tmp_path, name, env=None, timeout=180):
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 -m cnm train ARGS`;
    per-rank stdout/stderr in files. Returns (returncode, seconds, torchrun's output, logs)."""
    logs = tmp_path / f"logs-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "--log-dir", str(logs), "--redirects", "3", "-m", "cnm", "train", *args]
    full_env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    full_env.pop(D.FAULT_ENV, None)
    full_env.update(env or {})
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - t0

    def rank_log(rank: int, stream: str) -> str:
        files = sorted(logs.glob(f"**/attempt_0/{rank}/{stream}.log"))
        return files[-1].read_text() if files else ""

    return out.returncode, elapsed, out.stdout + out.stderr, rank_log


def test_torchrun_cli_trains_fails_cleanly_and_resumes_with_one_process(tmp_path):
    data = index_dataset(tmp_path / "data", train=40, test=23)
    run = tmp_path / "run"
    args = ["--data", str(data), "--out", str(run), "--arch", "resnet20", "--peers", "2", "--batch-size", "8",
            "--limit-train", "32", "--device", "cpu", "--loader", "resident", "--quiet", "--dist-timeout", "60"]
    # 1. one epoch on 2 processes: exit 0, rank 0 alone logs and writes
    rc, _, out, log = torchrun([*args, "--epochs", "1"], tmp_path, "ok")
    assert rc == 0, out + log(0, "stderr") + log(1, "stderr")
    assert "2 processes (gloo)" in log(0, "stdout") and log(1, "stdout") == ""
    assert [r["epoch"] for r in ckpt.read_jsonl(run / "metrics.jsonl")] == [1]
    # 2. resumed on 2 processes for 2 more epochs, process 1 crashes at epoch 2, step 1: every
    #    process is gone within seconds, with a clear message; epoch 1's checkpoint is intact
    rc, elapsed, out, log = torchrun([*args, "--epochs", "3", "--resume"], tmp_path, "fail",
                                     env={D.FAULT_ENV: "1:2:1"})
    assert rc != 0 and elapsed < 90, out
    assert "CNM_FAULT: injected failure at rank 1, epoch 2, step 1" in log(1, "stderr")
    rank0 = log(0, "stderr")
    assert rank0 == "" or "error: rank 0: " in rank0, rank0     # killed by torchrun, or its own line
    assert "Traceback" not in rank0
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in ckpt.read_jsonl(run / "metrics.jsonl")] == [1]
    # 3. the world-2 checkpoint continues in one process
    result = train(make_config(None, {"out": str(run), "resume": True, "epochs": 2, "quiet": True}), explicit={"epochs"})
    assert [r["epoch"] for r in result["rows"]] == [1, 2]
    assert result["rows"][-1]["global_step"] == 2 + 4              # 2 steps/epoch on 2 ranks, then 4


def test_torchrun_hung_process_makes_the_others_fail_after_the_timeout(tmp_path):
    data = index_dataset(tmp_path / "data", train=40, test=23)
    run = tmp_path / "run"
    args = ["--data", str(data), "--out", str(run), "--arch", "resnet20", "--peers", "2", "--batch-size", "8",
            "--limit-train", "32", "--device", "cpu", "--loader", "resident", "--quiet", "--epochs", "2", "--dist-timeout", "8"]
    rc, elapsed, out, log = torchrun(args, tmp_path, "hang", env={D.FAULT_ENV: "1:2:1:hang"})
    assert rc != 0 and elapsed < 90, out
    assert "CNM_FAULT: hanging at rank 1, epoch 2, step 1" in log(1, "stderr")
    lines = [l for l in log(0, "stderr").splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: all-reduce failed"), log(0, "stderr")
    assert "did not answer within 8 s (--dist-timeout)" in lines[0]
    assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- the step's seam


class _TripleComm(D.Comm):
    """A stand-in for 2 ranks whose all-reduce returns 3x this rank's values: the average is then
    1.5x the local gradient, so a pack/unpack that lost or misplaced values shows."""

    world = 2

    def __init__(self):
        super().__init__()
        self.blocks = set()

    def all_reduce_sum(self, t, *, block=True):
        self.blocks.add(block)
        return t.mul_(3.0)


def _steps_agree(device, cuda_graphs):
    """TrainStep with GradAllReduce (as the loop installs it) == TrainStep with a plain hook
    that scales the gradients by 1.5; a short batch in the middle runs eagerly."""
    # lazy: a helper of another test module, imported only where used
    from tests.trainer.test_step import _assert_peers_close, _batch, _make, _peer_params

    ref = _make(peer_exec="grouped", channels_last=True, device=device)
    ref.grad_hook = lambda: torch._foreach_mul_([q.grad for q in ref.optimizer.params], 1.5)
    dp = _make(peer_exec="grouped", channels_last=True, device=device, cuda_graphs=cuda_graphs)
    comm = _TripleComm()
    dp.grad_hook = D.GradAllReduce(dp.optimizer.params, comm)
    for i, b in enumerate((16, 16, 8, 16, 16)):
        x, y = _batch(i, device, b=b)
        ref(x, y, epoch=0, step=i)
        dp(x, y, epoch=0, step=i)
    if cuda_graphs:
        assert len(dp._graphs) == 2
        torch.cuda.synchronize()
    _assert_peers_close(_peer_params(ref), _peer_params(dp), atol=1e-4 if cuda_graphs else 1e-6)
    assert comm.blocks == {False}                        # the host never waits inside the step


def test_step_with_gradient_averaging_equals_scaled_gradients_cpu():
    _steps_agree("cpu", cuda_graphs=False)


@pytest.mark.gpu
def test_cuda_graphs_around_the_all_reduce_equal_eager(cuda_device, cuda_fp32_exact):
    """The two CUDA graphs with pack (end of the first) and unpack (start of the second) captured,
    the collective replayed eagerly between them, and an eager short batch in the middle."""
    _steps_agree("cuda", cuda_graphs=True)
