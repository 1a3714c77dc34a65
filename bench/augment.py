"""`cnm bench`: augmentation throughput of every pipeline against the CPU-augment baseline.

A pipeline delivers finished Cut^nMix peer views `[P,B,3,32,32]` on the training device
(docs/design.md#the-batch-contract); each registers its builder here (`REGISTRY`, table order):
`cpu` (the baseline: torch DataLoader, per-sample numpy crop/flip in workers, CPU mixing),
`ffcv`, `dali` (loader + the op on the device), `dali-native` (Cut^nMix as a DALI graph),
`resident` (the set in device memory) and `op` (the op alone on one device-resident batch: the
ceiling, with its bandwidth against the device's peak; `--op-batch-size 65536` for that figure).

Unit: images/s = samples per second with all P views finished (P views = ONE image); min/median/
max over `repeats` timed regions after a warm-up (`bench.harness.measure`), each median against
the `cpu` median, peak host and device memory. A pipeline whose back-end is missing or cannot
run on the device is a row `available: false` with the reason. See docs/performance.md.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench import harness, isolated, peaks, stats
from bench.harness import Workload, option
from pipeline.backends import available, require
from pipeline.data.manifest import load_manifest, write_dataset
from pipeline.environment import load_average, run_environment
from pipeline.errors import CnmError
from pipeline.loaders import make_loader
from pipeline.ops import MODES, CutNMix, resolve_impl

REGISTRY = harness.Registry("pipeline")
BASELINE = "cpu"



@dataclass
class Context:
    """What a pipeline builder gets: the resolved device, data and op settings."""

    config: AugmentConfig
    device: torch.device
    data_dir: Path
    out_dtype: torch.dtype
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def make_augment(self) -> CutNMix:
        """The Cut^nMix op with this run's settings."""
        cfg = self.config
        return CutNMix(peers=cfg.peers, mode=cfg.mode, mean=self.mean, std=self.std,
                       out_dtype=self.out_dtype)


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


@REGISTRY.register("cpu", "torch DataLoader, per-sample numpy crop/flip in workers, CPU mixing (baseline)")
def build_cpu(ctx: Context) -> Workload:
    return _loader_workload(ctx, "cpu")


@REGISTRY.register("ffcv", "FFCV loader + Cut^nMix op on the device")
def build_ffcv(ctx: Context) -> Workload:
    return _loader_workload(ctx, "ffcv")


@REGISTRY.register("dali", "DALI loader + Cut^nMix op on the device")
def build_dali(ctx: Context) -> Workload:
    return _loader_workload(ctx, "dali")


@REGISTRY.register("dali-native", "DALI loader with Cut^nMix as a DALI graph")
def build_dali_native(ctx: Context) -> Workload:
    """The DALI loader with Cut^nMix as a DALI graph (`make_loader(..., native_augment=True)`)."""
    return _loader_workload(ctx, "dali", native_augment=True)


@REGISTRY.register("resident", "dataset resident on the device + Cut^nMix op")
def build_resident(ctx: Context) -> Workload:
    return _loader_workload(ctx, "resident")


@REGISTRY.register("op", "Cut^nMix op alone on one device-resident batch (no loading)")
def build_op(ctx: Context) -> Workload:
    """The op alone: one batch of the train split copied to the device once, augmented per step.

    Bytes per image are the minimum traffic (`stats.op_bytes` without partner reads: the boxes
    are drawn inside every call); `python -m bench.op_speed` counts them on fixed parameters.
    """
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

    impl = resolve_impl(getattr(aug, "impl", "auto"), ctx.device)
    return Workload(step=step, bytes_per_image=bytes_per_batch / b, batch_size=b,
                    notes={"impl": impl, "bytes_per_batch": bytes_per_batch})


PIPELINES = REGISTRY.names()
BUILDERS: dict[str, Builder] = REGISTRY.builders()
DESCRIPTIONS = {name: REGISTRY.description(name) for name in PIPELINES}
# pipeline -> optional back-end it needs (import name for pipeline.backends)
BACKEND_OF = {"ffcv": "ffcv", "dali": "nvidia.dali", "dali-native": "nvidia.dali"}

UNIT = ("images/s: samples per second delivered on the device with all P peer views finished "
        "(the P views of one sample count as one image)")


@dataclass
class AugmentConfig:
    """Settings of one `cnm bench` run; each field is one flag (cnm/cmd_bench.py)."""

    data: str = option("synthetic", "a `cnm prepare` directory, or `synthetic` for a temporary "
                       "random CIFAR-shaped set")
    synthetic_images: int = option(50000, "train images in the synthetic set")
    device: str = option("auto", "auto | cuda | cuda:N | cpu")
    peers: int = option(3, "views per sample (P)")
    batch_size: int = option(512, "images per batch")
    mode: str = option("cutnmix", "mixing mode of the op", MODES)
    dtype: str = option("auto", "dtype of the views (auto: bf16 on CUDA, fp32 on CPU)",
                        ("auto", *harness.DTYPES))
    pipelines: tuple[str, ...] = option(PIPELINES, "comma list of pipelines to time, in order",
                                        PIPELINES, multiple=True)
    repeats: int = option(5, "timed regions per pipeline")
    batches: int | None = option(None, "batches per timed region")
    images: int | None = option(None, "images per timed region (whole batches)")
    seconds: float = option(1.0, "without --batches/--images: size each timed region to last "
                            "about this long")
    warmup: int = option(3, "untimed batches first")
    seed: int = option(0, "random seed")
    op_batch_size: int | None = option(None, "batch of the `op` row (default: --batch-size; use "
                                       "e.g. 65536 for its bandwidth)")
    peak_gbps: float | None = option(None, "device peak memory bandwidth in GB/s (default on CUDA: "
                                     "datasheet value by device name, else the measured copy "
                                     "bandwidth)")

    def validate(self) -> None:
        harness.check_choices(self)
        for name in ("peers", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise CnmError(f"{harness.flag_name(name)} must be >= 1")
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


# ----------------------------------------------------------------------------- data & device


@contextlib.contextmanager
def synthetic_dataset(num_images: int, seed: int, *, beton: bool | None = None) -> Iterator[Path]:
    """A temporary prepared directory of `num_images` random CIFAR-shaped train images.

    Pixels are uniform random uint8 (throughput does not depend on content); 10 classes. The
    directory (and its FFCV file, when ffcv is installed) is removed on exit.
    """
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
    try:
        require(backend, f"the {name} pipeline")
    except CnmError as e:
        return str(e)
    return None


def run_pipeline(name: str, builder: Builder, ctx: Context, *, clock: harness.Clock = time.perf_counter,
                 sync: Callable[[], None] | None = None, peak: tuple[float, str] | None = None) -> dict:
    """The result row of one pipeline (`harness.measure`), a failure becoming an unavailable row.

    peak: (peak GB/s, what it is) of the device, for workloads that declare bytes per image.
    """
    cfg = ctx.config
    missing = backend_missing(name)
    if missing is not None:
        return _unavailable(name, missing)

    def run() -> dict:
        m = harness.measure(lambda: builder(ctx), device=ctx.device, warmup=cfg.warmup,
                            repeats=cfg.repeats, seconds=cfg.seconds, clock=clock, sync=sync,
                            steps=lambda w: per_repeat_batches(cfg, w.batch_size))
        row = {"pipeline": name, "available": True, "description": DESCRIPTIONS.get(name, ""),
               "ratio_to_cpu": None,  # filled in by add_ratios once the baseline is known
               **harness.timing_row(m, unit="batches")}
        if m.notes:
            row["notes"] = m.notes
        if m.bytes_per_image:
            add_bandwidth(row, m.bytes_per_image, peak)
        return row

    return harness.guarded(run, lambda reason: _unavailable(name, reason))


def run_spec(spec: dict) -> dict:
    """The row of `spec` computed in a child process (bench.isolated)."""
    cfg = harness.config_from_dict(AugmentConfig, spec["config"])
    ctx = context_for(cfg, Path(spec["data_dir"]))
    peak = tuple(spec["peak"]) if spec.get("peak") else None
    return run_pipeline(spec["name"], BUILDERS[spec["name"]], ctx, peak=peak)


def context_for(cfg: AugmentConfig, data_dir: Path) -> Context:
    """The Context of a run on a prepared directory (device, dtype and mean/std resolved)."""
    device = harness.resolve_device(cfg.device)
    manifest = load_manifest(data_dir)
    return Context(config=cfg, device=device, data_dir=Path(data_dir),
                   out_dtype=harness.resolve_dtype(cfg.dtype, device),
                   mean=tuple(manifest.mean), std=tuple(manifest.std))


def add_ratios(results: list[dict], baseline: str = BASELINE) -> None:
    """Set `ratio_to_cpu` of every available row to its median / the baseline's median."""
    harness.add_ratios(results, key="pipeline", baseline=baseline, field="ratio_to_cpu")


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

    builders: pipeline name -> builder (default: the registered ones); tests inject fakes.
    clock, sync: the timing clock and device synchronisation (default: perf_counter and
                 torch.cuda.synchronize on CUDA); tests inject fakes.
    isolate: time every pipeline in a fresh Python process (bench.isolated), so that memory,
             threads and worker processes left by one pipeline cannot slow down or inflate the
             next one (`cnm bench` does; needs the default builders, clock and sync).
    """
    cfg.validate()
    if isolate and (builders is not None or sync is not None or clock is not time.perf_counter):
        raise ValueError("isolate=True times the real pipelines: no injected builders, clock or sync")
    builders = BUILDERS if builders is None else builders
    say = progress or (lambda msg: None)
    device = harness.resolve_device(cfg.device)
    out_dtype = harness.resolve_dtype(cfg.dtype, device)
    env = run_environment(device)  # before the run: its date and load average are the start's
    # the `op` row's reference: --peak-gbps, else on CUDA the datasheet or the measured copy
    # bandwidth of an unknown GPU; a CPU has none (its DRAM bandwidth is the board's)
    peak = None
    if cfg.peak_gbps is not None or device.type == "cuda":
        peak = peaks.reference_peak(device, cfg.peak_gbps)

    with contextlib.ExitStack() as stack:
        if cfg.data == "synthetic":
            want_beton = "ffcv" in cfg.pipelines and available("ffcv")
            say(f"writing a synthetic set of {cfg.synthetic_images} images")
            data_dir = stack.enter_context(synthetic_dataset(cfg.synthetic_images, cfg.seed, beton=want_beton))
        else:
            data_dir = Path(cfg.data)
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
                row = isolated.run_isolated({"module": __name__, "config": asdict(cfg), "name": name,
                                             "data_dir": str(data_dir), "peak": list(peak) if peak else None})
                if "pipeline" not in row:
                    row = _unavailable(name, row["reason"]) | {"failed": True}
            else:
                row = run_pipeline(name, builders[name], ctx, clock=clock, sync=sync, peak=peak)
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
