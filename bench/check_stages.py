"""The stages of `cnm check`, one per child process: `python -m bench.check_stages STAGE
--device cuda|cpu --result PATH --work DIR` (run by bench/check.py, which owns the timeouts).

A stage prints what it does (the log) and writes PATH: {"status": passed|skipped|failed,
"numbers": {key figures}, "notes": [lines]}. Every dependency on code other helpers own is in
the ADAPTERS section below (command lines and imports), so it can be adapted in one place.
Needs only torch, numpy, click, rich, pytest (triton optional): anything else missing is a
stated skip. See docs/cli.md#cnm-check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import backends
from pipeline.environment import describe
from pipeline.ops import MODES, cutnmix, draw_params
from pipeline.ops.numpy_baseline import numpy_cutnmix
from pipeline.ops.params import CIFAR10_MEAN, CIFAR10_STD, norm_constants
from trainer.distributed import GradAllReduce, ProcessGroupComm
from trainer.peers import build_peers
from trainer.teacher import EMATeacher, ema_decay

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# ================================================================ ADAPTERS (other helpers' code)
# Command lines of the tools the stages run (full sizes on CUDA, tiny on the CPU), and the
# trainer/pipeline imports, each imported where used: a module that is broken or renamed then
# fails only the stages that need it, with its error in their log.


def op_sweep_command(json_path: Path, cuda: bool) -> list[str]:
    """The op bandwidth sweep: `python -m bench.op_speed --sweep` (= `cnm bench op --sweep`;
    B 512 .. 262144 on CUDA), the JSON document to json_path. Adjust here if its flags change."""
    if cuda:
        return [PY, "-m", "bench.op_speed", "--sweep", "--impls", "auto", "--repeats", "3", "--seconds", "0.2",
                "--json", str(json_path)]
    return [PY, "-m", "bench.op_speed", "--sweep", "--max-batch", "128", "--impls", "auto", "--repeats", "1",
            "--seconds", "0.05", "--warmup", "1", "--json", str(json_path)]


def op_figures(row: dict) -> dict | None:
    """(batch, impl, per-s, GB/s, % of peak) of one row of that JSON, or None for a row without
    timings (unavailable). Reads the bench's rows: `batch`, `images_per_s`/`bandwidth_gbps`
    ({"median": ...}) and `fraction_of_peak`."""
    def median(v):
        return v.get("median") if isinstance(v, dict) else v

    if not isinstance(row, dict) or "batch" not in row or not row.get("available", True):
        return None
    per_s = median(row.get("images_per_s"))
    if per_s is None:
        return None
    frac = row.get("fraction_of_peak")
    return {"batch": row["batch"], "impl": row.get("pipeline") or row.get("impl"), "per_s": per_s,
            "gbps": median(row.get("bandwidth_gbps")), "pct_peak": None if frac is None else 100 * frac}


def bench_command(json_path: Path, cuda: bool) -> list[str]:
    """`cnm bench` over every pipeline (those not installed come back as unavailable rows)."""
    if cuda:
        return [PY, "-m", "cnm", "bench", "--repeats", "3", "--seconds", "0.5", "-q", "--json", str(json_path)]
    return [PY, "-m", "cnm", "bench", "--device", "cpu", "--batch-size", "8", "--peers", "2", "--repeats", "1",
            "--batches", "2", "--warmup", "1", "--synthetic-images", "32", "--pipelines", "cpu,resident,op",
            "--no-isolate", "-q", "--json", str(json_path)]


def bench_train_command(json_path: Path, cuda: bool) -> list[str]:
    """`cnm bench train`: every step variant on CUDA; eager fp32, tiny, on the CPU."""
    if cuda:
        return [PY, "-m", "cnm", "bench", "train", "--repeats", "3", "--seconds", "0.5", "-q",
                "--json", str(json_path)]
    return [PY, "-m", "cnm", "bench", "train", "--device", "cpu", "--arch", "resnet20", "--peers", "2",
            "--batch-size", "8", "--num-classes", "10", "--repeats", "1", "--steps", "1", "--warmup", "1",
            "--variants", "eager-fp32", "--no-isolate", "-q", "--json", str(json_path)]


def prepare_command(data_dir: Path, cuda: bool) -> list[str]:
    """A synthetic set: full size (50k train) on CUDA, tiny on the CPU."""
    sizes = ["--train-size", "50000", "--test-size", "10000"] if cuda else ["--train-size", "128", "--test-size", "32"]
    return [PY, "-m", "cnm", "prepare", "--dataset", "synthetic", *sizes, "--no-beton", "--out", str(data_dir)]


def train_command(data_dir: Path, run_dir: Path, cuda: bool) -> list[str]:
    """`cnm train`: 2 epochs with the CUDA defaults; 1 tiny epoch on the CPU."""
    if cuda:
        return [PY, "-m", "cnm", "train", "--data", str(data_dir), "--epochs", "2", "--out", str(run_dir), "--quiet"]
    return [PY, "-m", "cnm", "train", "--data", str(data_dir), "--epochs", "1", "--limit-train", "64",
            "--batch-size", "32", "--arch", "resnet20", "--peers", "2", "--device", "cpu", "--out", str(run_dir),
            "--quiet"]


def train_epoch_rows(run_dir: Path) -> list[dict]:
    """The per-epoch rows `cnm train` appended to RUN/metrics.jsonl (keys epoch_s, images_per_s)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pytest_command(cuda: bool) -> list[str]:
    base = [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(REPO_ROOT / "tests")]
    return base if cuda else base + ["--collect-only"]


def describe_environment() -> dict:
    """cnm's own environment report (pipeline/environment.py)."""
    return describe()


def build_peerset(archs: list[str], num_classes: int, device):
    """A PeerSet of `archs` (trainer.peers.build_peers), on `device`."""
    return build_peers(archs, num_classes, "loop").to(device)


def ema_teacher(peerset, decay: float):
    """trainer.teacher.EMATeacher: `.update(step 0-d tensor)`, `.module` the EMA PeerSet."""
    return EMATeacher(peerset, decay=decay)


def world1_grad_all_reduce(params, device: torch.device):
    """A world-1 process group (NCCL on CUDA, gloo on the CPU) and the trainer's gradient
    averager over it (trainer.distributed.GradAllReduce: pack / reduce / unpack, or call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device.type == "cuda"
    # device_id (torch >= 2.3) binds the NCCL communicator to the device at once
    kw = {"device_id": device} if cuda and "device_id" in inspect.signature(dist.init_process_group).parameters else {}
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=0, world_size=1, **kw)
    comm = ProcessGroupComm(0, 1, 0, ("gloo", "nccl") if cuda else ("gloo",))
    comm.device(device.type)                     # cuda: makes cuda:LOCAL_RANK current
    return GradAllReduce(params, comm), dist.get_backend()


def triton_views(images, params, out_dtype):
    """The Triton kernel itself (pipeline.ops.triton_impl; its base offsets are always 64-bit)."""
    from pipeline.ops.triton_impl import triton_cutnmix_views  # triton: an optional back-end

    mean32, inv32 = norm_constants(CIFAR10_MEAN, CIFAR10_STD)
    return triton_cutnmix_views(images, params, mean32, inv32, out_dtype)


# ================================================================ helpers


class Report:
    """The stage's result: status, numbers, notes; `fail(msg)` marks it failed."""

    def __init__(self):
        self.status = "passed"
        self.numbers: dict = {}
        self.notes: list[str] = []

    def fail(self, msg: str) -> None:
        print(f"FAIL: {msg}", flush=True)
        self.status = "failed"
        self.notes.append(msg)

    def note(self, msg: str) -> None:
        print(f"note: {msg}", flush=True)
        self.notes.append(msg)

    def skip(self, msg: str) -> None:
        print(f"skip: {msg}", flush=True)
        if self.status == "passed":
            self.status = "skipped"
        self.notes.append(msg)


def run_tool(argv: list[str], timeout_s: float | None = None) -> int:
    """Run a command with this process's stdout/stderr (the stage log); its exit status."""
    print(f"$ {' '.join(argv)}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, timeout=timeout_s,
                          check=False).returncode


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0] if text else ''}"


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float tensors of one dtype."""
    width = a.element_size() * 8
    ints = {16: torch.int16, 32: torch.int32}[width]

    def ordered(t):
        i = t.detach().cpu().contiguous().view(ints).to(torch.int64)
        mag = i & ((1 << (width - 1)) - 1)
        return torch.where(i < 0, -mag, mag)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def triton_usable(cuda: bool) -> str | None:
    """None when the Triton kernel can run here, else why not."""
    if not backends.available("triton"):
        return "triton is not installed (pip install triton)"
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET is not 1"
    return None


# ================================================================ stages


def stage_environment(rep: Report, dev: torch.device, work: Path) -> None:
    env = describe_environment()
    print(json.dumps(env, indent=1, default=str))
    pk, cu = env.get("packages", {}), env.get("cuda", {})
    rep.numbers.update(device=cu.get("device") or "CPU", torch=pk.get("torch"), triton=pk.get("triton") or "absent")
    git = env.get("git") or {}
    rep.numbers["commit"] = (git.get("commit") or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")
    if cu.get("error"):
        rep.fail(f"torch/CUDA: {cu['error']}")
    if dev.type == "cuda":
        if not cu.get("available"):
            rep.fail("--device cuda, but torch sees no CUDA device")
            return
        rep.numbers["cuda"] = torch.version.cuda
        rep.numbers["cudnn"] = torch.backends.cudnn.version()
        rep.numbers["capability"] = cu.get("capability")
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=False)
            rep.numbers["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "?"
        else:
            rep.note("nvidia-smi not on PATH: driver version unknown")
        _free, total = torch.cuda.mem_get_info()
        rep.numbers["memory_gb"] = round(total / 1e9, 1)
    missing = [k for k in ("ffcv", "nvidia-dali") if not pk.get(k)]
    if missing:
        rep.note(f"optional back-ends absent (their bench rows are skipped): {', '.join(missing)}")


def _pytest_counts(text: str) -> dict:
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", text):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    if m:
        counts["collected"] = int(m.group(1))
    return counts


def stage_pytest_gpu(rep: Report, dev: torch.device, work: Path) -> None:
    if not (REPO_ROOT / "tests").is_dir():
        rep.skip(f"no tests/ directory in {REPO_ROOT} (an installed copy without the test suite)")
        return
    cuda = dev.type == "cuda"
    argv = pytest_command(cuda)
    print(f"$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout + proc.stderr)
    counts = _pytest_counts("\n".join(proc.stdout.strip().splitlines()[-3:]))
    rep.numbers.update(counts)
    if proc.returncode != 0:
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        rep.fail(f"pytest exited with status {proc.returncode}" + (": " + "; ".join(failed[:5]) if failed else ""))
    elif not cuda:
        if not counts.get("collected"):
            rep.fail("no gpu-marked tests collected")
        rep.note("collect-only: the gpu tests were not run (no CUDA)")


def _oracle(images, params, dtype):
    """The reference views: numpy per-sample oracle in float32, rounded once to `dtype`."""
    b = images.shape[0]
    ref = numpy_cutnmix(images.cpu(), torch.arange(b), params.to("cpu"), mean=CIFAR10_MEAN, std=CIFAR10_STD,
                        out_dtype=torch.float32)[0]
    return ref.to(dtype)


def _views(images, params, dtype, impl):
    return cutnmix(images, torch.arange(images.shape[0], device=images.device), params, out_dtype=dtype,
                   impl=impl)[0]


def stage_op(rep: Report, dev: torch.device, work: Path) -> None:
    cuda = dev.type == "cuda"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    why_not = triton_usable(cuda)
    if why_not:
        rep.skip(f"Triton kernel not checked: {why_not}")
    # (batch, implementations checked at that batch)
    plan = [(1, ["triton", "torch", "reference"]), (4097, ["triton", "torch"]), (65536, ["triton", "torch"])] if cuda \
        else [(1, ["triton", "torch"]), (3, ["triton", "torch"]), (512, ["torch"])]
    checked = worst = 0
    for b, impls in plan:
        impls = [i for i in impls if not (i == "triton" and why_not)]
        t0 = time.perf_counter()
        for mode in MODES:
            g = torch.Generator(device=dev).manual_seed(b)
            params = draw_params(b, 3, 32, 32, mode=mode, mix_prob=0.8, generator=g, device=dev)
            imgs = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=g, device=dev)
            ref32 = _oracle(imgs, params, torch.float32).to(dev)
            for name, dt in dtypes.items():
                ref = ref32.to(dt)
                for impl in impls:
                    out = _views(imgs, params, dt, impl)
                    # exact, except Triton's CPU interpreter, which truncates to a half dtype
                    allowed = 1 if (impl == "triton" and not cuda and dt != torch.float32) else 0
                    d = 0 if torch.equal(out, ref) else ulp_distance(out, ref)
                    worst = max(worst, d) if impl == "triton" else worst
                    checked += 1
                    if d > allowed:
                        rep.fail(f"{impl} != reference: B={b} mode={mode} {name}: {d} ulp (allowed {allowed})")
        print(f"B={b}: {', '.join(impls)} x {len(MODES)} modes x {len(dtypes)} dtypes "
              f"vs the reference in {time.perf_counter() - t0:.1f} s", flush=True)
    rep.numbers.update(comparisons=checked, batches="/".join(str(b) for b, _ in plan),
                       triton_max_ulp=worst if not why_not else "n/a")
    if why_not:
        return
    _op_wide(rep, dev)


def _op_wide(rep: Report, dev: torch.device) -> None:
    """The 64-bit offsets: on CUDA at a batch whose output passes 2**31 values (when the memory
    allows) against the torch path, on the CPU the same kernel at B=8 against the oracle; then
    its last samples against the oracle through a small batch of them and their partners."""
    cuda = dev.type == "cuda"
    b = 2**31 // (3 * 32 * 32 * 3) + 1 if cuda else 8   # CUDA: P=3 fp32 views just past 2**31 values
    if cuda:
        need = b * 3072 * (1 + 2 * 3 * 4) + b * 40 * 40 * 3 * 4 + 3 * b * 1024 * 4   # in, 2 outs, torch's temps
        free, _ = torch.cuda.mem_get_info(dev)
        if free < 1.2 * need:
            rep.note(f"int64 offsets not checked: needs ~{need / 1e9:.0f} GB free on the device, "
                     f"{free / 1e9:.0f} GB are")
            rep.numbers["int64_path"] = "skipped (memory)"
            return
    g = torch.Generator(device=dev).manual_seed(31)
    params = draw_params(b, 3, 32, 32, mode="cutnmix", mix_prob=0.8, generator=g, device=dev)
    imgs = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=g, device=dev)
    if cuda:
        out = _views(imgs, params, torch.float32, "triton")
        assert out.numel() > 2**31, out.shape
        expected = _views(imgs, params, torch.float32, "torch")
    else:
        out = triton_views(imgs, params, torch.float32)
        expected = _oracle(imgs, params, torch.float32)
    same = torch.equal(out, expected)
    del expected
    k = min(16, b // 2)
    keep = torch.arange(b - k, b)
    sub, rows = sub_batch_params(params, keep)
    tail = ulp_distance(out[:, keep.to(dev)].cpu(), _oracle(imgs[rows.to(dev)], sub, torch.float32)[:, :k])
    what = f"B={b} ({out.numel() / 2**31:.3f}x2^31)" if cuda else f"B={b}"
    rep.numbers["int64_path"] = f"{what} " + ("equal" if same and not tail else "MISMATCH")
    if not same:
        rep.fail(f"the 64-bit-offset kernel != {'torch' if cuda else 'the reference'} at B={b}")
    if tail:
        rep.fail(f"the 64-bit-offset kernel differs from the reference by {tail} ulp in the last {k} samples")
    if not cuda:
        rep.note("int64 offsets past 2^31 elements not run (no CUDA); the kernel (always 64-bit base "
                 "offsets) was checked at B=8")


def sub_batch_params(params, keep: torch.Tensor):
    """A small batch holding the samples `keep` [K] first, then their partners: (its params on
    the CPU, the rows [N] of the big batch it is made of). Its samples 0..K-1 have the same
    views as `keep` in the big batch (same crops, flips, boxes, partners), so the oracle on the
    small batch checks the big one where the oracle itself would be too slow."""
    p = params.to("cpu")
    keep = [int(i) for i in keep.cpu()]
    rows = list(dict.fromkeys(keep + [int(p.perm[i]) for i in keep]))
    pos = {r: j for j, r in enumerate(rows)}
    perm = [pos[int(p.perm[i])] for i in keep]
    # the partners' own partners are not checked: complete perm to a permutation
    perm += [j for j in range(len(rows)) if j not in set(perm)]
    idx = torch.tensor(rows)
    fields = {}
    for name, value in vars(p).items():
        if torch.is_tensor(value):
            value = value[:, idx] if value.dim() == 2 else value[idx]
        fields[name] = value
    fields["perm"] = torch.tensor(perm)
    return type(p)(**fields), idx


def stage_op_sweep(rep: Report, dev: torch.device, work: Path) -> None:
    cuda = dev.type == "cuda"
    path = work / "op_sweep.json"
    rc = run_tool(op_sweep_command(path, cuda))
    if rc != 0 or not path.exists():
        rep.fail(f"the op sweep exited with status {rc}" + ("" if path.exists() else " and wrote no JSON"))
        return
    doc = json.loads(path.read_text())
    for r in doc.get("results", []):
        if r.get("failed"):
            rep.fail(f"{r.get('pipeline')} at B={r.get('batch')}: {r.get('reason')}")
    rows = [f for f in map(op_figures, doc.get("results", [])) if f]
    if not rows:
        rep.fail("the op sweep timed no row")
        return
    batches = sorted({f["batch"] for f in rows})
    rep.numbers["batches"] = f"{batches[0]}..{batches[-1]}"
    if cuda:
        best = max((f for f in rows if f["gbps"]), key=lambda f: f["gbps"], default=None)
        if best is None:
            rep.fail("the op sweep reported no GB/s")
            return
        rep.numbers.update(best_gbps=round(best["gbps"]), at_batch=best["batch"], row=best["impl"])
        if best["pct_peak"] is not None:
            rep.numbers["pct_peak"] = round(best["pct_peak"], 1)
        else:
            rep.note("no reference peak bandwidth for this device: % of peak not given")
    else:
        best = max(rows, key=lambda f: f["per_s"])
        rep.numbers.update(best_images_per_s=round(best["per_s"]), at_batch=best["batch"], row=best["impl"])
        rep.note("GB/s and % of the device's peak not measured (no CUDA): CPU images/s for small B only")
    for f in rows:
        gbps = f"{f['gbps']:8.1f} GB/s" if f["gbps"] else ""
        pct = f"{f['pct_peak']:5.1f}% of peak" if f["pct_peak"] is not None else ""
        print(f"{f['impl']!s:28s} B={f['batch']:7d} {f['per_s']:14,.0f} images/s {gbps} {pct}", flush=True)


def _bench_rows(rep: Report, path: Path, key: str) -> list[dict]:
    rows = json.loads(path.read_text())["results"]
    for r in rows:
        if r.get("failed"):
            rep.fail(f"{r.get(key)}: {r.get('reason')}")
        elif not r.get("available"):
            rep.note(f"{r.get(key)} not run: {r.get('reason')}")
    return [r for r in rows if r.get("available") and r.get("images_per_s")]


def stage_bench(rep: Report, dev: torch.device, work: Path) -> None:
    path = work / "bench.json"
    rc = run_tool(bench_command(path, dev.type == "cuda"))
    if rc != 0 or not path.exists():
        rep.fail(f"`cnm bench` exited with status {rc}")
        return
    for r in _bench_rows(rep, path, "pipeline"):
        rep.numbers[f"{r['pipeline']} img/s"] = round(r["images_per_s"]["median"])
    if not rep.numbers:
        rep.fail("no pipeline could be timed")


def stage_bench_train(rep: Report, dev: torch.device, work: Path) -> None:
    path = work / "bench_train.json"
    rc = run_tool(bench_train_command(path, dev.type == "cuda"))
    if rc != 0 or not path.exists():
        rep.fail(f"`cnm bench train` exited with status {rc}")
        return
    for r in _bench_rows(rep, path, "variant"):
        rep.numbers[f"{r['variant']} img/s"] = round(r["images_per_s"]["median"])
    if not rep.numbers:
        rep.fail("no step variant could be timed")


def stage_train(rep: Report, dev: torch.device, work: Path) -> None:
    cuda = dev.type == "cuda"
    data, run = work / "data", work / "run"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    rc = run_tool(prepare_command(data, cuda))
    rep.numbers["prepare_s"] = round(time.perf_counter() - t0, 1)
    if rc != 0:
        rep.fail(f"`cnm prepare` exited with status {rc}")
        return
    rc = run_tool(train_command(data, run, cuda))
    if rc != 0:
        rep.fail(f"`cnm train` exited with status {rc}")
        return
    rows = train_epoch_rows(run)
    if not rows:
        rep.fail("`cnm train` wrote no epoch to metrics.jsonl")
        return
    rep.numbers["epochs"] = len(rows)
    for i, r in enumerate(rows, 1):
        rep.numbers[f"epoch{i}_s"] = round(r["epoch_s"], 2)
    rep.numbers["img/s (last epoch)"] = round(rows[-1]["images_per_s"])
    if not cuda:
        rep.note("ran 1 epoch of 64 images on the CPU; the 2-epoch 50k CUDA-defaults run needs CUDA")
    shutil.rmtree(data, ignore_errors=True)


def _perturb(module, seed: int) -> None:
    """Move every float parameter and buffer of `module` a little (as a training step would),
    with noise drawn on their device (no host-to-device copy: no sync)."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g, device=dev, dtype=t.dtype), alpha=0.01)


def _state(module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


@contextlib.contextmanager
def sync_errors():
    """Any host sync inside the block raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def stage_ema_capture(rep: Report, dev: torch.device, work: Path) -> None:
    decay = 0.9
    live = build_peerset(["resnet20", "resnet20"], 10, dev)
    teacher = ema_teacher(live, decay)
    steps = 4
    if dev.type != "cuda":
        for step in range(steps):
            _perturb(live, step)
            before = [t.clone() for t in teacher.module.parameters()]
            teacher.update(torch.tensor(step))
            d = float(ema_decay(torch.tensor(step), decay))   # the teacher's own warm-up schedule
            for ema, old, new in zip(teacher.module.parameters(), before, live.parameters()):
                torch.testing.assert_close(ema, d * old + (1 - d) * new, rtol=1e-5, atol=1e-6)
        rep.numbers.update(updates=steps, formula="matches")
        rep.note("CUDA-graph capture under sync debug mode 'error' not run (no CUDA)")
        return
    twin = ema_teacher(live, decay)             # the eager reference, same start
    step_t = torch.zeros((), dtype=torch.int64, device=dev)
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        teacher.update(step_t)                   # warm-up (allocator, kernels)
    torch.cuda.current_stream(dev).wait_stream(side)
    with torch.no_grad():
        for t, s in zip(_state(teacher.module), _state(twin.module)):
            t.copy_(s)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    # sync errors only around the update, inside the capture (entering a capture synchronises)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), sync_errors():
        teacher.update(step_t)
    for step in range(steps):
        _perturb(live, step)
        graph.replay()
        with sync_errors():                      # the eager update never syncs either
            twin.update(step_t)
        step_t.add_(1)
    bad = sum(not torch.equal(a, b) for a, b in zip(_state(teacher.module), _state(twin.module)))
    rep.numbers.update(replays=steps, tensors=len(_state(twin.module)), differing=bad)
    if bad:
        rep.fail(f"{bad} EMA tensors differ between the captured graph and eager after {steps} updates")


def _loss(peers, views, y):
    logits, _ = peers(views)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.repeat(logits.shape[0]))


def stage_allreduce_graphs(rep: Report, dev: torch.device, work: Path) -> None:
    cuda = dev.type == "cuda"
    if not dist.is_available():
        rep.skip("this torch build has no torch.distributed")
        return
    if cuda:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    P, B, steps = 2, (32 if cuda else 8), 3
    a = build_peerset(["resnet20"] * P, 10, dev)
    b = copy.deepcopy(a)                         # the reference: same weights
    try:
        hook, backend = world1_grad_all_reduce(a.parameters(), dev)
    except Exception as e:  # noqa: BLE001 - a group that cannot form is this stage's finding
        rep.fail(f"could not form a world-1 process group: {_first_line(e)}")
        return
    try:
        rep.numbers["backend"] = backend
        opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
        ema_a, ema_b = ema_teacher(a, 0.9), ema_teacher(b, 0.9)
        g = torch.Generator(device="cpu").manual_seed(1)
        batches = [(torch.randn(P, B, 3, 32, 32, generator=g).to(dev), torch.randint(0, 10, (B,), generator=g).to(dev))
                   for _ in range(steps + 3 if cuda else steps)]
        if cuda:
            _graphs_vs_eager(rep, dev, a, b, opt_a, opt_b, ema_a, ema_b, hook, batches)
        else:
            # gloo, eager: a step with the all-reduce hook == a step without it (world 1)
            for i, (x, y) in enumerate(batches):
                for peers, opt, ema, h in ((a, opt_a, ema_a, hook), (b, opt_b, ema_b, None)):
                    opt.zero_grad()
                    _loss(peers, x, y).backward()
                    if h is not None:
                        h()
                    opt.step()
                    ema.update(torch.tensor(i))
            bad = sum(not torch.equal(p, q) for p, q in zip(_state(a) + _state(ema_a.module),
                                                            _state(b) + _state(ema_b.module)))
            rep.numbers.update(steps=len(batches), differing=bad)
            if bad:
                rep.fail(f"{bad} tensors differ between the step with the gloo all-reduce hook and without")
            rep.note("NCCL and the two captured CUDA graphs not run (no CUDA): gloo, eager")
    finally:
        dist.destroy_process_group()


def _graphs_vs_eager(rep, dev, a, b, opt_a, opt_b, ema_a, ema_b, hook, batches) -> None:
    """Part A (forward, backward, pack) and part B (unpack, SGD, EMA) captured as two graphs
    with the NCCL all-reduce eager between their replays; `b` runs the same steps eagerly, with
    its own GradAllReduce called whole between backward and the optimiser step."""
    hook_b = GradAllReduce(b.parameters(), hook.comm)
    step_a = torch.zeros((), dtype=torch.int64, device=dev)
    x0, y0 = batches[0]
    sx, sy = x0.clone(), y0.clone()
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):                # warm-up: 3 eager steps on both, same batches
        for i, (x, y) in enumerate(batches[:3]):
            for peers, opt, ema, h in ((a, opt_a, ema_a, hook), (b, opt_b, ema_b, hook_b)):
                opt.zero_grad(set_to_none=True)
                _loss(peers, x, y).backward()
                h()
                opt.step()
                ema.update(torch.full((), i, device=dev))
    torch.cuda.current_stream(dev).wait_stream(side)
    step_a.fill_(3)
    opt_a.zero_grad(set_to_none=True)
    ga, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(ga, capture_error_mode="thread_local"):
        loss_a = _loss(a, sx, sy)
        loss_a.backward()
        hook.pack([p.grad for p in a.parameters()])
    grads = [p.grad for p in a.parameters()]
    with torch.cuda.graph(gb, pool=ga.pool(), capture_error_mode="thread_local"):
        hook.unpack(grads)
        opt_a.step()
        ema_a.update(step_a)
        step_a.add_(1)
    worst = 0.0
    for i, (x, y) in enumerate(batches[3:], 3):
        sx.copy_(x)
        sy.copy_(y)
        ga.replay()
        hook.reduce()                            # the collective, eager, between the graphs
        gb.replay()
        opt_b.zero_grad(set_to_none=True)
        loss_b = _loss(b, x, y)
        loss_b.backward()
        hook_b()
        opt_b.step()
        ema_b.update(torch.full((), i, device=dev))
        worst = max(worst, abs(float(loss_a) - float(loss_b)))
    torch.cuda.synchronize(dev)
    diffs = [float((p.float() - q.float()).abs().max()) for p, q in
             zip(_state(a) + _state(ema_a.module), _state(b) + _state(ema_b.module)) if p.numel()]
    rep.numbers.update(graph_steps=len(batches) - 3, max_param_diff=max(diffs), max_loss_diff=worst)
    if max(diffs) > 1e-4 or worst > 1e-4:
        rep.fail(f"graphs + NCCL differ from eager: max parameter difference {max(diffs):.3g}, "
                 f"loss {worst:.3g}")


STAGES = {
    "environment": stage_environment,
    "pytest-gpu": stage_pytest_gpu,
    "op": stage_op,
    "op-sweep": stage_op_sweep,
    "bench": stage_bench,
    "bench-train": stage_bench_train,
    "train": stage_train,
    "ema-capture": stage_ema_capture,
    "allreduce-graphs": stage_allreduce_graphs,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.check_stages", description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--result", required=True, help="where to write the stage's result JSON")
    ap.add_argument("--work", required=True, help="a scratch directory")
    args = ap.parse_args(argv)
    rep = Report()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    try:
        if dev.type == "cuda" and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cuda" and not torch.cuda.is_available():
            rep.fail("--device cuda, but torch sees no CUDA device")
        else:
            STAGES[args.stage](rep, dev, work)
    except Exception as e:  # noqa: BLE001 - the stage failed; the traceback goes to its log
        import traceback

        traceback.print_exc()
        rep.fail(f"raised {_first_line(e)}")
    Path(args.result).write_text(json.dumps({"status": rep.status, "numbers": rep.numbers, "notes": rep.notes},
                                            default=str))
    print(f"stage {args.stage}: {rep.status}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
