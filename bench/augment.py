"""`cnm bench`: augmentation throughput of every pipeline against the CPU-augment baseline.

A *pipeline* delivers finished Cut^nMix peer views `[P,B,3,32,32]` on the training device
(see DESIGN.md, "Batch contract" and "Cut^nMix"). Pipelines, side by side in one run:

- `cpu`         the baseline a competent user writes without cnm: a torch DataLoader whose
                workers crop/flip per sample in numpy, then batch mixing and normalisation on
                the CPU (`pipeline.ops.numpy_baseline`), views copied to the device;
- `ffcv`        the FFCV loader (prepared `.beton`) + the Cut^nMix op on the device;
- `dali`        the DALI loader + the Cut^nMix op on the device;
- `dali-native` the DALI loader with Cut^nMix expressed as a DALI graph (`pipeline.ops.dali_graph`);
- `resident`    the dataset resident in device memory, shuffled by index there, + the op;
- `op`          the Cut^nMix op alone on one device-resident batch (no loading at all): the
                ceiling every loader is measured against; reports achieved memory bandwidth
                against the device's datasheet peak (`bench.peaks`) when the device is known.
                At a training batch (512) a GPU spends most of a call launching kernels; the
                bandwidth figure wants a large `--op-batch-size` (e.g. 65536).

Unit: images/s = samples per second delivered on the device with all P peer views finished;
the P views of one sample count as ONE image. Each pipeline runs a warm-up (not timed: worker
start-up, compilation, first-epoch set-up), then `repeats` timed regions of the same number of
batches, with the device synchronised at the start and end of every region (`bench.harness`).
Reported: min/median/max images/s over the repeats, the ratio of each median to the `cpu`
median of the same run, peak host memory (process + loader workers) and peak device memory.

A pipeline whose back-end is missing (ffcv, nvidia.dali), or that cannot run on the chosen
device, is reported `available: false` with the reason instead of failing the run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import harness, stats
from bench.peaks import lookup as lookup_peak
from pipeline.errors import CnmError

PIPELINES = ("cpu", "ffcv", "dali", "dali-native", "resident", "op")
BASELINE = "cpu"
MODES = ("cutnmix", "cutmix", "mixup", "none")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

DESCRIPTIONS = {
    "cpu": "torch DataLoader, per-sample numpy crop/flip in workers, CPU mixing (baseline)",
    "ffcv": "FFCV loader + Cut^nMix op on the device",
    "dali": "DALI loader + Cut^nMix op on the device",
    "dali-native": "DALI loader with Cut^nMix as a DALI graph",
    "resident": "dataset resident on the device + Cut^nMix op",
    "op": "Cut^nMix op alone on one device-resident batch (no loading)",
}

# pipeline -> optional back-end it needs (import name for pipeline.backends)
BACKEND_OF = {"ffcv": "ffcv", "dali": "nvidia.dali", "dali-native": "nvidia.dali"}

UNIT = ("images/s: samples per second delivered on the device with all P peer views finished "
        "(the P views of one sample count as one image)")


@dataclass
class AugmentConfig:
    """Settings of one `cnm bench` run (1:1 with its flags)."""

    data: str = "synthetic"          # a `cnm prepare` directory, or "synthetic"
    device: str = "auto"             # auto | cuda | cpu | cuda:N
    peers: int = 3
    batch_size: int = 512
    mode: str = "cutnmix"
    pipelines: tuple[str, ...] = PIPELINES
    repeats: int = 5
    batches: int | None = None       # batches per timed region; None: from --images or --seconds
    images: int | None = None        # images per timed region (rounded up to whole batches)
    seconds: float = 1.0             # with neither: size regions to last about this long
    warmup: int = 3                  # untimed batches before timing
    seed: int = 0
    dtype: str = "auto"              # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32
    synthetic_images: int = 50000    # size of the synthetic train split (CIFAR's is 50000)
    peak_gbps: float | None = None   # override the device's datasheet peak bandwidth
    op_batch_size: int | None = None # batch of the `op` row (None: batch_size); large -> bandwidth

    def validate(self) -> None:
        unknown = [p for p in self.pipelines if p not in PIPELINES]
        if unknown:
            raise CnmError(f"unknown pipeline(s) {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
        if not self.pipelines:
            raise CnmError("--pipelines is empty; choose from " + ", ".join(PIPELINES))
        if self.mode not in MODES:
            raise CnmError(f"unknown --mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise CnmError(f"unknown --dtype {self.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        for name in ("peers", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise CnmError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup < 0:
            raise CnmError("--warmup must be >= 0")
        if self.batches is not None and self.images is not None:
            raise CnmError("give --batches or --images, not both")
        if self.batches is not None and self.batches < 1:
            raise CnmError("--batches must be >= 1")
        if self.images is not None and self.images < 1:
            raise CnmError("--images must be >= 1")
        if not self.seconds > 0:
            raise CnmError("--seconds must be > 0")
        if self.data == "synthetic" and self.synthetic_images < self.batch_size:
            raise CnmError(f"--synthetic-images ({self.synthetic_images}) must be at least "
                           f"--batch-size ({self.batch_size})")
        if self.op_batch_size is not None and self.op_batch_size < 1:
            raise CnmError("--op-batch-size must be >= 1")
        if self.peak_gbps is not None and not self.peak_gbps > 0:
            raise CnmError("--peak-gbps must be > 0")


class Unavailable(Exception):
    """A pipeline cannot run here (missing back-end, wrong device); the message says why."""


@dataclass
class Context:
    """What a pipeline builder gets: the resolved device, data and op settings."""

    config: AugmentConfig
    device: torch.device
    data_dir: Path
    out_dtype: torch.dtype
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def make_augment(self):
        """The Cut^nMix op with this run's settings (pipeline.ops.CutNMix)."""
        from pipeline.ops import CutNMix

        cfg = self.config
        return CutNMix(peers=cfg.peers, mode=cfg.mode, mean=self.mean, std=self.std,
                       out_dtype=self.out_dtype)


@dataclass
class Workload:
    """A pipeline ready to time: `step()` delivers one batch of finished views, returns B."""

    step: Callable[[], int]
    close: Callable[[], None] = lambda: None
    bytes_per_image: float | None = None   # memory traffic per image (the op: bandwidth)
    batch_size: int | None = None          # images per step when not the run's --batch-size
    notes: dict = field(default_factory=dict)


Builder = Callable[[Context], Workload]


# ----------------------------------------------------------------------------- pipelines


def _views_of(batch) -> torch.Tensor:
    """The views tensor [P,B,3,H,W] of a loader item (views, y_a, y_b, lam)."""
    views = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(views, torch.Tensor) or views.dim() != 5:
        raise CnmError(f"pipeline yielded {type(views).__name__} "
                       f"{tuple(getattr(views, 'shape', ()))}, expected views [P,B,3,H,W]")
    return views


def endless(loader) -> Iterator:
    """Batches of `loader` across epochs (set_epoch(0), (1), ...), as a training run sees them."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise CnmError(f"loader {getattr(loader, 'name', '?')} yielded no batch in an epoch "
                           "(fewer samples than one batch?)")
        epoch += 1


def _loader_workload(ctx: Context, kind: str, **extra) -> Workload:
    from pipeline.loaders import make_loader

    cfg = ctx.config
    loader = make_loader(kind, ctx.data_dir, split="train", batch_size=cfg.batch_size,
                         device=str(ctx.device), seed=cfg.seed, augment=ctx.make_augment(), **extra)
    stream = endless(loader)
    expected_peers = cfg.peers

    def step() -> int:
        views = _views_of(next(stream))
        if views.shape[0] != expected_peers:
            raise CnmError(f"{kind} loader yielded {views.shape[0]} views, expected {expected_peers}")
        return int(views.shape[1])

    def close() -> None:
        stream.close()
        for attr in ("close", "shutdown"):
            fn = getattr(loader, attr, None)
            if callable(fn):
                with contextlib.suppress(Exception):
                    fn()
                break

    return Workload(step=step, close=close, notes={"loader": getattr(loader, "name", kind)})


def build_cpu(ctx: Context) -> Workload:
    return _loader_workload(ctx, "cpu")


def build_ffcv(ctx: Context) -> Workload:
    return _loader_workload(ctx, "ffcv")


def build_dali(ctx: Context) -> Workload:
    return _loader_workload(ctx, "dali")


def build_dali_native(ctx: Context) -> Workload:
    """The DALI loader with Cut^nMix as a DALI graph (`make_loader(..., native_augment=True)`)."""
    return _loader_workload(ctx, "dali", native_augment=True)


def build_resident(ctx: Context) -> Workload:
    return _loader_workload(ctx, "resident")


def build_op(ctx: Context) -> Workload:
    """The op alone: one batch of the train split copied to the device once, augmented per step."""
    from pipeline.data.manifest import load_manifest

    cfg = ctx.config
    images, labels = load_manifest(ctx.data_dir).load_split("train", verify=False)
    b = cfg.op_batch_size or cfg.batch_size
    idx = np.arange(b) % len(images)  # a split smaller than the batch is repeated
    x = torch.from_numpy(np.ascontiguousarray(images[idx])).to(ctx.device)
    y = torch.from_numpy(np.ascontiguousarray(labels[idx])).to(ctx.device)
    aug = ctx.make_augment()
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    _, h, w, c = x.shape
    itemsize = torch.empty((), dtype=ctx.out_dtype).element_size()
    bytes_per_batch = stats.op_bytes(b, h, w, cfg.peers, itemsize, channels=c)

    def step() -> int:
        views, _, _, _ = aug(x, y, generator=gen)
        return int(views.shape[1])

    impl = getattr(aug, "impl", "auto")
    with contextlib.suppress(Exception):  # the implementation "auto" resolves to on this device
        from pipeline.ops import resolve_impl

        impl = resolve_impl(impl, ctx.device)
    return Workload(step=step, bytes_per_image=bytes_per_batch / b, batch_size=b,
                    notes={"impl": impl, "bytes_per_batch": bytes_per_batch})


BUILDERS: dict[str, Builder] = {
    "cpu": build_cpu,
    "ffcv": build_ffcv,
    "dali": build_dali,
    "dali-native": build_dali_native,
    "resident": build_resident,
    "op": build_op,
}


# ----------------------------------------------------------------------------- data & device


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available else cpu; an explicit cuda without CUDA is a CnmError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CnmError(f"unknown --device {device!r}; use auto, cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CnmError("--device cuda: no CUDA device is available here (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise CnmError(f"--device {device}: only cuda and cpu are supported")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from bench.report import cpu_model

    return cpu_model() or "cpu"


@contextlib.contextmanager
def synthetic_dataset(num_images: int, seed: int, *, beton: bool | None = None) -> Iterator[Path]:
    """A temporary prepared directory of `num_images` random CIFAR-shaped train images.

    Pixels are uniform random uint8 (throughput does not depend on content); 10 classes. The
    directory (and its FFCV file, when ffcv is installed) is removed on exit.
    """
    from pipeline.data.manifest import write_dataset

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_images, dtype=np.int64)
    tmp = Path(tempfile.mkdtemp(prefix="cnm-bench-"))
    try:
        out = tmp / "synthetic"
        write_dataset(out, {"train": (images, labels)}, dataset="synthetic",
                      class_names=[f"class{i}" for i in range(10)],
                      source={"kind": "cnm bench synthetic", "seed": seed}, beton=beton)
        del images, labels
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- running


def per_repeat_batches(cfg: AugmentConfig, batch_size: int | None = None) -> int | None:
    """Batches per timed region from --batches / --images; None: calibrate from --seconds."""
    if cfg.batches is not None:
        return cfg.batches
    if cfg.images is not None:
        return math.ceil(cfg.images / (batch_size or cfg.batch_size))
    return None


def calibrate(step: Callable[[], int], sync: Callable[[], None], target_s: float, *,
              clock: harness.Clock = time.perf_counter, probe_s: float = 0.25,
              max_steps: int = 100_000) -> int:
    """Steps per timed region so that one region lasts about `target_s` (at least 2 steps).

    Runs untimed probe steps until `probe_s` has passed (the device synchronised), and scales.
    """
    start = clock()
    n = 0
    while True:
        step()
        n += 1
        if n % 4 == 0 or n == 1:
            sync()
            elapsed = clock() - start
            if elapsed >= probe_s or n >= max_steps:
                break
    per_step = max(elapsed / n, 1e-9)
    return max(2, min(max_steps, math.ceil(target_s / per_step)))


def _unavailable(name: str, reason: str) -> dict:
    return {"pipeline": name, "available": False, "reason": reason,
            "description": DESCRIPTIONS.get(name, ""),
            "images_per_s": None, "ratio_to_cpu": None,
            "peak_host_mb": None, "peak_device_mb": None}


def backend_missing(name: str) -> str | None:
    """Why pipeline `name` cannot run here for want of its back-end (naming the pip extra), or None."""
    backend = BACKEND_OF.get(name)
    if backend is None:
        return None
    from pipeline.backends import require

    try:
        require(backend, f"the {name} pipeline")
    except CnmError as e:
        return str(e)
    return None


def run_pipeline(name: str, builder: Builder, ctx: Context, *, clock: harness.Clock,
                 sync: Callable[[], None] | None = None, peak: tuple[float, str] | None = None) -> dict:
    """Build, warm up, time and close one pipeline; its result row (see `run_augment_bench`).

    peak: (datasheet GB/s, what it is) of the device, for workloads that declare bytes per image.
    """
    cfg = ctx.config
    sync = sync or harness.device_sync(ctx.device)
    missing = backend_missing(name)
    if missing is not None:
        return _unavailable(name, missing)
    workload = None
    mem = harness.PeakMemory(ctx.device)
    try:
        with mem:
            try:
                workload = builder(ctx)
            except (Unavailable, CnmError, ImportError) as e:
                return _unavailable(name, _one_line(e))
            except Exception as e:  # a back-end that cannot start here (e.g. DALI without a GPU)
                return _unavailable(name, f"failed to start: {e.__class__.__name__}: {_one_line(e)}")
            steps = per_repeat_batches(cfg, workload.batch_size)
            t0 = clock()
            for _ in range(cfg.warmup):
                workload.step()
            sync()
            warm = clock() - t0
            if steps is None:
                steps = calibrate(workload.step, sync, cfg.seconds, clock=clock)
            timings = harness.time_repeats(workload.step, warmup=0, per_repeat=steps,
                                           repeats=cfg.repeats, sync=sync, clock=clock)
        notes, bytes_per_image = dict(workload.notes), workload.bytes_per_image
    finally:
        if workload is not None:
            with contextlib.suppress(Exception):
                workload.close()
        workload = None
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    per_s = stats.rates(timings.items, timings.seconds)
    row = {
        "pipeline": name,
        "available": True,
        "description": DESCRIPTIONS.get(name, ""),
        "images_per_s": stats.summarize(per_s),
        "ratio_to_cpu": None,  # filled in by add_ratios once the baseline is known
        "peak_host_mb": _round(mem.peak_host_mb),
        "peak_device_mb": _round(mem.peak_device_mb),
        "peak_device_growth_mb": _round(mem.peak_device_growth_mb),
        "host_memory_method": mem.host_method,
        "torch_threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "batches_per_repeat": steps,
        "images_per_repeat": timings.items,
        "seconds_per_repeat": [round(s, 6) for s in timings.seconds],
        "warmup_batches": cfg.warmup,
        "warmup_seconds": round(warm, 6),
    }
    if notes:
        row["notes"] = notes
    if bytes_per_image:
        add_bandwidth(row, bytes_per_image, peak)
    return row


def run_guarded(name: str, builder: Builder, ctx: Context, *, clock: harness.Clock,
                sync: Callable[[], None] | None = None, peak: tuple[float, str] | None = None) -> dict:
    """run_pipeline, with a failure while running turned into an unavailable row."""
    try:
        return run_pipeline(name, builder, ctx, clock=clock, sync=sync, peak=peak)
    except (CnmError, ImportError) as e:
        return _unavailable(name, f"failed while running: {_one_line(e)}")
    except Exception as e:  # one broken back-end must not lose the other pipelines' figures
        row = _unavailable(name, f"failed while running: {e.__class__.__name__}: {_one_line(e)}")
        row["failed"] = True
        return row


def context_for(cfg: AugmentConfig, data_dir: Path) -> Context:
    """The Context of a run on a prepared directory (device, dtype and mean/std resolved)."""
    from pipeline.data.manifest import load_manifest

    device = resolve_device(cfg.device)
    manifest = load_manifest(data_dir)
    return Context(config=cfg, device=device, data_dir=Path(data_dir),
                   out_dtype=resolve_dtype(cfg.dtype, device),
                   mean=tuple(manifest.mean), std=tuple(manifest.std))


def config_from_dict(values: dict) -> AugmentConfig:
    values = dict(values)
    values["pipelines"] = tuple(values["pipelines"])
    return AugmentConfig(**values)


def _one_line(e: BaseException) -> str:
    """The first line of an error; for errors re-raised from a worker (torch DataLoader puts the
    worker's traceback in the message) also the original error, its last line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return e.__class__.__name__
    if len(lines) > 1 and any("Traceback" in ln for ln in lines):
        return f"{lines[0]} {lines[-1]}"
    return lines[0]


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


def add_ratios(results: list[dict], baseline: str = BASELINE) -> None:
    """Set `ratio_to_cpu` of every available row to its median / the baseline's median."""
    base = next((r for r in results if r["pipeline"] == baseline and r["available"]), None)
    base_median = base["images_per_s"]["median"] if base else None
    for r in results:
        if r["available"]:
            r["ratio_to_cpu"] = stats.ratio(r["images_per_s"]["median"], base_median)


def add_bandwidth(row: dict, bytes_per_image: float, peak: tuple[float, str] | None) -> None:
    """Achieved GB/s (min/median/max over repeats) of a row from its rates, and vs the peak."""
    bw = {k: v * bytes_per_image / 1e9 for k, v in row["images_per_s"].items()}
    row["bytes_per_image"] = bytes_per_image
    row["bandwidth_gbps"] = bw
    row["peak_gbps"] = peak[0] if peak else None
    row["peak_source"] = peak[1] if peak else None
    row["fraction_of_peak"] = stats.fraction_of_peak(bw["median"], peak[0] if peak else None)


def run_augment_bench(cfg: AugmentConfig, *, builders: dict[str, Builder] | None = None,
                      clock: harness.Clock = time.perf_counter,
                      sync: Callable[[], None] | None = None,
                      progress: Callable[[str], None] | None = None,
                      isolate: bool = False) -> dict:
    """Run every selected pipeline once, in order; the JSON document (see bench.report).

    builders: pipeline name -> builder (default BUILDERS); tests inject fakes.
    clock, sync: the timing clock and device synchronisation (default: perf_counter and
                 torch.cuda.synchronize on CUDA); tests inject fakes.
    isolate: time every pipeline in a fresh Python process (bench.isolated), so that memory,
             threads and worker processes left by one pipeline cannot slow down or inflate the
             next one (`cnm bench` does; needs the default builders, clock and sync).
    """
    from bench.report import load_average, environment

    cfg.validate()
    if isolate and (builders is not None or sync is not None or clock is not time.perf_counter):
        raise ValueError("isolate=True times the real pipelines: no injected builders, clock or sync")
    builders = BUILDERS if builders is None else builders
    say = progress or (lambda msg: None)
    device = resolve_device(cfg.device)
    out_dtype = resolve_dtype(cfg.dtype, device)
    dev_name = device_name(device)
    env = environment(device)  # before the run: its date and load average are the start's
    if cfg.peak_gbps is not None:
        peak = (float(cfg.peak_gbps), "--peak-gbps")
    else:
        peak = lookup_peak(dev_name) if device.type == "cuda" else None

    with contextlib.ExitStack() as stack:
        if cfg.data == "synthetic":
            from pipeline.backends import available

            want_beton = "ffcv" in cfg.pipelines and available("ffcv")
            say(f"writing a synthetic set of {cfg.synthetic_images} images")
            data_dir = stack.enter_context(synthetic_dataset(cfg.synthetic_images, cfg.seed, beton=want_beton))
        else:
            data_dir = Path(cfg.data)
        from pipeline.data.manifest import load_manifest

        manifest = load_manifest(data_dir)
        if manifest.counts.get("train", 0) < cfg.batch_size:
            raise CnmError(f"{data_dir}: train split has {manifest.counts.get('train', 0)} images, "
                           f"fewer than one batch of {cfg.batch_size}")
        ctx = Context(config=cfg, device=device, data_dir=data_dir, out_dtype=out_dtype,
                      mean=tuple(manifest.mean), std=tuple(manifest.std))
        results = []
        for name in cfg.pipelines:
            if name not in builders:
                results.append(_unavailable(name, "no builder for this pipeline"))
                continue
            say(f"timing {name}" + (" (in its own process)" if isolate else ""))
            missing = backend_missing(name)
            if missing is not None:
                row = _unavailable(name, missing)
            elif isolate:
                from bench.isolated import run_isolated

                row = run_isolated({"kind": "augment", "config": asdict(cfg), "name": name,
                                    "data_dir": str(data_dir), "peak": list(peak) if peak else None})
                if not row.get("available", False) and "pipeline" not in row:
                    row = _unavailable(name, row["reason"]) | {"failed": True}
            else:
                row = run_guarded(name, builders[name], ctx, clock=clock, sync=sync, peak=peak)
            results.append(row)
            if row["available"]:
                med = row["images_per_s"]["median"]
                say(f"  {name}: {med:,.0f} images/s (median of {cfg.repeats})")
            else:
                say(f"  {name}: unavailable ({row['reason']})")

    add_ratios(results)
    config = asdict(cfg)
    config["pipelines"] = list(cfg.pipelines)
    config["device_resolved"] = str(device)
    config["dtype_resolved"] = str(out_dtype).replace("torch.", "")
    config["data_images"] = manifest.counts.get("train")
    return {
        "schema": "cnm-bench/1",
        "bench": "augment",
        "unit": UNIT,
        "baseline": BASELINE,
        "env": env | {"load_average_end": load_average()},
        "config": config,
        "results": results,
    }
