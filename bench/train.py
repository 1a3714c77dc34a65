"""`cnm bench train`: throughput of the whole train step of the peer ensemble.

A step is what `cnm train` runs per batch: Cut^nMix on the device, forward of the P peers (and
the EMA teacher), the online-distillation loss, backward, SGD, EMA update; timed on one fixed
device-resident batch (loading left out), by `bench.harness.measure`. Images/s counts samples
(P views = one image); ms/step is the wall time of one step.

Variants register here (`REGISTRY`, table order), each adding to the previous where it applies:
`eager-fp32` (the plain PyTorch reference), `channels-last`, `channels-last+bf16` (CUDA),
`+cuda-graphs` (CUDA), `+grouped` (the P peers as one groups=P network; on a CPU on top of
`channels-last` in fp32). A variant that does not apply on the device is a row `available:
false` ("not applicable on cpu"). See docs/performance.md#the-train-step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bench import harness, isolated, stats
from bench.harness import Workload, option
from pipeline.environment import load_average, run_environment
from pipeline.errors import CnmError
from pipeline.ops import MODES
from trainer.models import check_arch
from bench.train_step import build_bench_step

BASELINE = "eager-fp32"


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


# name -> (device -> Variant), in table order; see the module docstring
REGISTRY = harness.Registry("variant")


@REGISTRY.register("eager-fp32", "loop over peers, NCHW, fp32, eager (the plain PyTorch reference)")
def _eager(device: torch.device) -> Variant:
    return Variant("eager-fp32", False, False, False, "loop")


@REGISTRY.register("channels-last", "+ channels-last memory format (fp32)")
def _channels_last(device: torch.device) -> Variant:
    return Variant("channels-last", True, False, False, "loop")


@REGISTRY.register("channels-last+bf16", "+ bf16 autocast (CUDA)")
def _bf16(device: torch.device) -> Variant:
    return Variant("channels-last+bf16", True, True, False, "loop", cuda_only=True)


@REGISTRY.register("+cuda-graphs", "+ the whole step captured in one CUDA graph (CUDA)")
def _graphs(device: torch.device) -> Variant:
    return Variant("+cuda-graphs", True, True, True, "loop", cuda_only=True)


@REGISTRY.register("+grouped", "+ the P peers as one grouped network (on a CPU: channels-last fp32)")
def _grouped(device: torch.device) -> Variant:
    cuda = device.type == "cuda"
    return Variant("+grouped", True, cuda, cuda, "grouped")


VARIANT_NAMES = REGISTRY.names()


def variant_for(name: str, device: torch.device) -> Variant:
    return REGISTRY[name].build(device)


@dataclass
class TrainBenchConfig:
    """Settings of one `cnm bench train` run; each field is one flag (cnm/cmd_bench.py)."""

    arch: str = option("resnet32", "peer architecture")
    peers: int = option(3, "number of peers")
    batch_size: int = option(128, "training batch size")
    device: str = option("auto", "auto | cuda | cuda:N | cpu")
    num_classes: int = option(100, "classes of the classifier heads")
    mix: str = option("cutnmix", "mixed-sample augmentation of the step", MODES)
    variants: tuple[str, ...] = option(VARIANT_NAMES, "comma list of step variants to time",
                                       VARIANT_NAMES, multiple=True)
    repeats: int = option(5, "timed regions per variant")
    steps: int | None = option(None, "train steps per timed region")
    seconds: float = option(1.0, "without --steps: size each timed region to last about this long")
    warmup: int | None = option(None, "untimed steps first (default 5 on CUDA, where the graph is "
                                "captured; 1 on CPU)")
    seed: int = option(0, "random seed")

    def validate(self) -> None:
        harness.check_choices(self)
        for name in ("peers", "batch_size", "repeats", "num_classes"):
            if getattr(self, name) < 1:
                raise CnmError(f"{harness.flag_name(name)} must be >= 1")
        if self.warmup is not None and self.warmup < 0:
            raise CnmError("--warmup must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise CnmError("--steps must be >= 1")
        if not self.seconds > 0:
            raise CnmError("--seconds must be > 0")


# factory(config, variant, device) -> Workload whose step() runs one train step and returns B
StepFactory = Callable[[TrainBenchConfig, Variant, torch.device], Workload]


def default_step_factory(cfg: TrainBenchConfig, variant: Variant, device: torch.device) -> Workload:
    """One real train step of `cnm train` (`build_bench_step`) on a fixed random uint8 batch held
    on the device; `step()` launches one step without synchronising."""
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


def run_variant(name: str, cfg: TrainBenchConfig, *, factory: StepFactory | None = None,
                clock: harness.Clock = time.perf_counter,
                sync: Callable[[], None] | None = None) -> dict:
    """The row of variant `name` (`harness.measure`); a failure becomes an unavailable row."""
    device = harness.resolve_device(cfg.device)
    variant = variant_for(name, device)
    if variant.cuda_only and device.type != "cuda":
        return _not_applicable(variant, f"not applicable on {device.type} (needs CUDA)")
    factory = factory or default_step_factory
    warmup = cfg.warmup if cfg.warmup is not None else (5 if device.type == "cuda" else 1)

    def run() -> dict:
        m = harness.measure(lambda: factory(cfg, variant, device), device=device, warmup=warmup,
                            repeats=cfg.repeats, steps=cfg.steps, seconds=cfg.seconds,
                            clock=clock, sync=sync)
        step_counts = [m.steps] * len(m.timings.seconds)
        return {"variant": name, "pipeline": name, "available": True,
                "settings": variant.settings(), "settings_text": variant.text(),
                "ms_per_step": stats.summarize(
                    stats.per_item_ms(step_counts, m.timings.seconds)),
                "ratio_to_eager": None,  # filled in by add_ratios
                **harness.timing_row(m, unit="steps")}

    return harness.guarded(run, lambda reason: _not_applicable(variant, reason))


def run_spec(spec: dict) -> dict:
    """The row of `spec` computed in a child process (bench.isolated)."""
    return run_variant(spec["name"], harness.config_from_dict(TrainBenchConfig, spec["config"]))


def add_ratios(results: list[dict], baseline: str = BASELINE) -> None:
    """`ratio_to_eager` = median images/s / the eager-fp32 median (None without that row)."""
    harness.add_ratios(results, key="variant", baseline=baseline, field="ratio_to_eager")


def run_train_bench(cfg: TrainBenchConfig, *, factory: StepFactory | None = None,
                    clock: harness.Clock = time.perf_counter, sync: Callable[[], None] | None = None,
                    progress: Callable[[str], None] | None = None, isolate: bool = False) -> dict:
    """Time every selected variant; the JSON document (schema in bench.report).

    factory, clock, sync: injected by tests (default: the real step, perf_counter, device sync).
    isolate: time every variant in a fresh Python process (bench.isolated), so that global state
             one variant sets (cuDNN autotuning, the CUDA allocator pool, threads) cannot favour
             or penalise the next (`cnm bench train` does).
    """
    cfg.validate()
    if isolate and (factory is not None or sync is not None or clock is not time.perf_counter):
        raise ValueError("isolate=True times the real step: no injected factory, clock or sync")
    say = progress or (lambda msg: None)
    if factory is None:
        for arch in cfg.arch.split(","):  # a one-line error before anything is built
            check_arch(arch.strip())
    device = harness.resolve_device(cfg.device)
    env = run_environment(device)  # before the run: its date and load average are the start's
    results = []
    for name in cfg.variants:
        say(f"timing {name}" + (" (in its own process)" if isolate else ""))
        variant = variant_for(name, device)
        if variant.cuda_only and device.type != "cuda":
            row = _not_applicable(variant, f"not applicable on {device.type} (needs CUDA)")
        elif isolate:
            row = isolated.run_isolated({"module": __name__, "config": asdict(cfg), "name": name})
            if "variant" not in row:
                row = _not_applicable(variant, row["reason"]) | {"failed": True}
        else:
            row = run_variant(name, cfg, factory=factory, clock=clock, sync=sync)
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
        "baseline": BASELINE,
        "env": env | {"load_average_end": load_average()},
        "config": config,
        "results": results,
    }
