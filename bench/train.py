"""`cnm bench train`: throughput of the whole train step of the peer ensemble.

A step is what `cnm train` runs per batch (trainer/step.py): Cut^nMix on the device, forward of
the P peers (and the EMA teacher), the online-distillation loss, backward, SGD, EMA update. It
is timed on one fixed device-resident batch of `--batch-size` random CIFAR-shaped images, so
loading is left out (`cnm bench` measures that). Images/s counts samples (the P views of a
sample are one image); ms/step is the wall time of one step with the device synchronised at the
end of every timed region.

Variants, each adding to the previous where it applies (DESIGN.md, "Speed"):

- `eager-fp32`         loop over peers, NCHW, fp32, eager (the plain PyTorch reference);
- `channels-last`      + channels-last memory format (fp32);
- `channels-last+bf16` + bf16 autocast (CUDA);
- `+cuda-graphs`       + the whole step captured in one CUDA graph (CUDA);
- `+grouped`           + the P peers run as one grouped network (groups=P convolutions); on a
                       CPU on top of `channels-last` in fp32.

Variants that do not apply on the device are reported `available: false` ("not applicable on
cpu"), not skipped silently.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bench import harness, stats
from bench.augment import Unavailable, Workload, _one_line, _round, calibrate, resolve_device
from pipeline.errors import CnmError


@dataclass(frozen=True)
class Variant:
    """One row of the train bench: the execution settings of the step."""

    name: str
    channels_last: bool
    bf16: bool
    cuda_graphs: bool
    peer_exec: str  # "loop" | "grouped"
    cuda_only: bool = False

    def settings(self) -> dict:
        return {"channels_last": self.channels_last, "bf16": self.bf16,
                "cuda_graphs": self.cuda_graphs, "peer_exec": self.peer_exec}

    def text(self) -> str:
        parts = ["channels-last" if self.channels_last else "NCHW",
                 "bf16" if self.bf16 else "fp32",
                 "graph" if self.cuda_graphs else "eager", self.peer_exec]
        return " ".join(parts)


VARIANT_NAMES = ("eager-fp32", "channels-last", "channels-last+bf16", "+cuda-graphs", "+grouped")


def variants_for(device: torch.device) -> list[Variant]:
    """The five variants with the settings they have on `device` (see the module docstring)."""
    cuda = device.type == "cuda"
    return [
        Variant("eager-fp32", False, False, False, "loop"),
        Variant("channels-last", True, False, False, "loop"),
        Variant("channels-last+bf16", True, True, False, "loop", cuda_only=True),
        Variant("+cuda-graphs", True, True, True, "loop", cuda_only=True),
        Variant("+grouped", True, cuda, cuda, "grouped"),
    ]


@dataclass
class TrainBenchConfig:
    """Settings of one `cnm bench train` run (1:1 with its flags)."""

    arch: str = "resnet32"
    peers: int = 3
    batch_size: int = 128
    device: str = "auto"
    num_classes: int = 100
    mix: str = "cutnmix"
    variants: tuple[str, ...] = VARIANT_NAMES
    repeats: int = 5
    steps: int | None = None       # steps per timed region; None: size regions by `seconds`
    seconds: float = 1.0
    warmup: int | None = None      # untimed steps first; None: 5 on CUDA (graph capture), 1 on CPU
    seed: int = 0

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANT_NAMES]
        if unknown:
            raise CnmError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANT_NAMES)}")
        if not self.variants:
            raise CnmError("--variants is empty; choose from " + ", ".join(VARIANT_NAMES))
        for name in ("peers", "batch_size", "repeats", "num_classes"):
            if getattr(self, name) < 1:
                raise CnmError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup is not None and self.warmup < 0:
            raise CnmError("--warmup must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise CnmError("--steps must be >= 1")
        if not self.seconds > 0:
            raise CnmError("--seconds must be > 0")


# factory(config, variant, device) -> Workload whose step() runs one train step and returns B
StepFactory = Callable[[TrainBenchConfig, Variant, torch.device], Workload]


def default_step_factory(cfg: TrainBenchConfig, variant: Variant, device: torch.device) -> Workload:
    """One real train step of `cnm train` (`trainer.step.build_bench_step`) on a fixed random
    uint8 batch held on the device; `step()` launches one step without synchronising."""
    try:
        from bench.train_step import build_bench_step
    except ImportError as e:
        raise Unavailable(f"trainer.step has no bench step factory ({_one_line(e)})") from None
    s = variant.settings()
    bench_step = build_bench_step(cfg.arch, cfg.peers, s["peer_exec"], device, bf16=s["bf16"],
                                  channels_last=s["channels_last"], cuda_graphs=s["cuda_graphs"],
                                  batch_size=cfg.batch_size, num_classes=cfg.num_classes,
                                  mix=cfg.mix, seed=cfg.seed)
    images, labels, b = bench_step.images, bench_step.labels, bench_step.images_per_step

    def run() -> int:
        bench_step(images, labels)
        return b

    return Workload(step=run, close=bench_step.close)


def _not_applicable(variant: Variant, reason: str) -> dict:
    return {"variant": variant.name, "pipeline": variant.name, "available": False, "reason": reason,
            "settings": variant.settings(), "settings_text": variant.text(),
            "images_per_s": None, "ms_per_step": None, "ratio_to_eager": None,
            "peak_host_mb": None, "peak_device_mb": None}


def run_variant(variant: Variant, factory: StepFactory, cfg: TrainBenchConfig, device: torch.device, *,
                clock: harness.Clock, sync: Callable[[], None]) -> dict:
    """Build, warm up and time one variant; its result row."""
    if variant.cuda_only and device.type != "cuda":
        return _not_applicable(variant, f"not applicable on {device.type} (needs CUDA)")
    workload = None
    mem = harness.PeakMemory(device)
    try:
        with mem:
            try:
                workload = factory(cfg, variant, device)
            except (Unavailable, CnmError, ImportError) as e:
                return _not_applicable(variant, _one_line(e))
            warmup = cfg.warmup if cfg.warmup is not None else (5 if device.type == "cuda" else 1)
            t0 = clock()
            for _ in range(warmup):
                workload.step()
            sync()
            warm = clock() - t0
            steps = cfg.steps if cfg.steps is not None else calibrate(workload.step, sync, cfg.seconds,
                                                                       clock=clock)
            timings = harness.time_repeats(workload.step, warmup=0, per_repeat=steps,
                                           repeats=cfg.repeats, sync=sync, clock=clock)
    finally:
        if workload is not None:
            with contextlib.suppress(Exception):
                workload.close()
        workload = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    per_s = stats.rates(timings.items, timings.seconds)
    step_counts = [steps] * len(timings.seconds)
    return {
        "variant": variant.name,
        "pipeline": variant.name,
        "available": True,
        "settings": variant.settings(),
        "settings_text": variant.text(),
        "images_per_s": stats.summarize(per_s),
        "ms_per_step": stats.summarize(stats.per_item_ms(step_counts, timings.seconds)),
        "ratio_to_eager": None,  # filled in by add_ratios
        "peak_host_mb": _round(mem.peak_host_mb),
        "peak_device_mb": _round(mem.peak_device_mb),
        "peak_device_growth_mb": _round(mem.peak_device_growth_mb),
        "host_memory_method": mem.host_method,
        "torch_threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "steps_per_repeat": steps,
        "images_per_repeat": timings.items,
        "seconds_per_repeat": [round(s, 6) for s in timings.seconds],
        "warmup_steps": warmup,
        "warmup_seconds": round(warm, 6),
    }


def add_ratios(results: list[dict], baseline: str = "eager-fp32") -> None:
    """`ratio_to_eager` = median images/s / the eager-fp32 median (None without that row)."""
    base = next((r for r in results if r["variant"] == baseline and r["available"]), None)
    base_median = base["images_per_s"]["median"] if base else None
    for r in results:
        if r["available"]:
            r["ratio_to_eager"] = stats.ratio(r["images_per_s"]["median"], base_median)


def run_variant_guarded(name: str, cfg: TrainBenchConfig, *, factory: StepFactory | None = None,
                        clock: harness.Clock = time.perf_counter,
                        sync: Callable[[], None] | None = None) -> dict:
    """The row of variant `name`; a failure while running becomes an unavailable row."""
    device = resolve_device(cfg.device)
    variant = {v.name: v for v in variants_for(device)}[name]
    sync = sync or harness.device_sync(device)
    try:
        return run_variant(variant, factory or default_step_factory, cfg, device, clock=clock, sync=sync)
    except (CnmError, ImportError) as e:
        return _not_applicable(variant, f"failed while running: {_one_line(e)}")
    except Exception as e:  # a broken variant must not lose the others' figures
        row = _not_applicable(variant, f"failed while running: {e.__class__.__name__}: {_one_line(e)}")
        row["failed"] = True
        return row


def config_from_dict(values: dict) -> TrainBenchConfig:
    values = dict(values)
    values["variants"] = tuple(values["variants"])
    return TrainBenchConfig(**values)


def _check_archs(arch: str) -> None:
    """A one-line CnmError for an unknown --arch before anything is built."""
    try:
        from trainer.models import check_arch
    except ImportError:
        return
    for name in arch.split(","):
        check_arch(name.strip())


def run_train_bench(cfg: TrainBenchConfig, *, factory: StepFactory | None = None,
                    clock: harness.Clock = time.perf_counter, sync: Callable[[], None] | None = None,
                    progress: Callable[[str], None] | None = None, isolate: bool = False) -> dict:
    """Time every selected variant; the JSON document (schema in bench.report).

    factory, clock, sync: injected by tests (default: the real step, perf_counter, device sync).
    isolate: time every variant in a fresh Python process (bench.isolated), so that global state
             one variant sets (cuDNN autotuning, the CUDA allocator pool, threads) cannot favour
             or penalise the next (`cnm bench train` does).
    """
    from bench.report import load_average, environment

    cfg.validate()
    if isolate and (factory is not None or sync is not None or clock is not time.perf_counter):
        raise ValueError("isolate=True times the real step: no injected factory, clock or sync")
    factory = factory or default_step_factory
    say = progress or (lambda msg: None)
    if factory is default_step_factory:
        _check_archs(cfg.arch)
    device = resolve_device(cfg.device)
    env = environment(device)  # before the run: its date and load average are the start's
    sync = sync or harness.device_sync(device)
    results = []
    for name in cfg.variants:
        say(f"timing {name}" + (" (in its own process)" if isolate else ""))
        variant = {v.name: v for v in variants_for(device)}[name]
        if variant.cuda_only and device.type != "cuda":
            row = _not_applicable(variant, f"not applicable on {device.type} (needs CUDA)")
        elif isolate:
            from bench.isolated import run_isolated

            row = run_isolated({"kind": "train", "config": asdict(cfg), "variant": name})
            if "variant" not in row:
                row = _not_applicable(variant, row["reason"]) | {"failed": True}
        else:
            row = run_variant_guarded(name, cfg, factory=factory, clock=clock, sync=sync)
        results.append(row)
        if row["available"]:
            say(f"  {name}: {row['images_per_s']['median']:,.0f} images/s, "
                f"{row['ms_per_step']['median']:.1f} ms/step")
        else:
            say(f"  {name}: n/a ({row['reason']})")
    add_ratios(results)
    config = asdict(cfg)
    config["variants"] = list(cfg.variants)
    config["device_resolved"] = str(device)
    return {
        "schema": "cnm-bench/1",
        "bench": "train",
        "unit": ("images/s: training samples per second (each sample's P peer views count as one "
                 "image); ms/step: wall time of one train step"),
        "baseline": "eager-fp32",
        "env": env | {"load_average_end": load_average()},
        "config": config,
        "results": results,
    }


__all__ = [
    "VARIANT_NAMES",
    "TrainBenchConfig",
    "Variant",
    "default_step_factory",
    "run_train_bench",
    "variants_for",
]
