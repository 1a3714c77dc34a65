"""The one timing harness of `cnm bench` (every row kind: pipelines, train-step variants, the op).

- `Registry`: rows register their builders with a decorator (`@REGISTRY.register("cpu", ...)`),
  in table order; a builder returns a `Workload` whose `step()` does one unit and returns B.
- `measure`: build, warm up, size the timed regions (`calibrate`), time them (`time_repeats`),
  with peak host/device memory (`PeakMemory`) and the workload closed afterwards.
- `timing_row`, `guarded`, `add_ratios`: the figures every row has, a failure turned into an
  unavailable row, and each median against the baseline's.
- `option`, `config_options`, `make_config`: config dataclass fields carrying their CLI help;
  the flags of `cnm bench` are generated 1:1 from them, as `cnm train`'s are.

The device is synchronised before the first timed region and at the end of every region, so
asynchronous CUDA work is paid for inside it; clock and sync are arguments, so tests drive the
harness with fake timings. See docs/performance.md#methodology.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import torch

from bench import stats
from pipeline.errors import CnmError
from pipeline.loaders.base import resolve_device as _resolve_device
from pipeline.ops.params import OUT_DTYPES

Clock = Callable[[], float]


# ----------------------------------------------------------------------------- config fields


def option(default, help: str, choices: tuple | None = None, *, multiple: bool = False):
    """A config dataclass field with its CLI help (and choices) as metadata.

    multiple: the field is a tuple of `choices`, given on the command line as a comma list.
    """
    meta = {"help": help, "choices": choices, "multiple": multiple}
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The CLI flag of a field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def config_from_dict(cls, values: dict):
    """A config dataclass from its `asdict` form (lists back to tuples)."""
    kinds = {f.name: f.metadata.get("multiple") for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if kinds.get(k) else v for k, v in values.items()})


def check_choices(cfg) -> None:
    """One CnmError line for a field outside its declared choices (comma lists too)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get("multiple"):
            if not value:
                raise CnmError(f"{flag_name(f.name)} is empty; choose from {', '.join(choices)}")
            bad = [v for v in value if v not in choices]
            if bad:
                raise CnmError(f"unknown {f.name.removesuffix('s')}(s) "
                               f"{', '.join(bad)}; choose from {', '.join(choices)}")
        elif value not in choices:
            raise CnmError(f"unknown {flag_name(f.name)} {value!r}; choose from {', '.join(choices)}")


def comma_list(value: str, choices: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise CnmError(f"{flag} is empty; choose from {','.join(choices)}")
    bad = [v for v in items if v not in choices]
    if bad:
        raise CnmError(f"{flag}: unknown {', '.join(bad)}; choose from {','.join(choices)}")
    if len(set(items)) != len(items):
        raise CnmError(f"{flag}: {value} names an entry twice")
    return items


def _scalar_type(f: dataclasses.Field) -> type:
    base = str(f.type).split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float, "str": str}.get(base, str)


def config_options(cls):
    """A decorator adding one click option per field of the config dataclass `cls`.

    Choices become click.Choice, comma-list fields (`multiple`) a comma-separated string, optional
    fields default to None; the defaults shown are the dataclass defaults.
    """
    def decorate(func):
        for f in reversed(dataclasses.fields(cls)):
            meta, flag = f.metadata, flag_name(f.name)
            if meta.get("multiple"):
                opt = click.option(flag, f.name, default=",".join(f.default), show_default=True,
                                   help=meta["help"] + f" (of {','.join(meta['choices'])})")
            elif _scalar_type(f) is bool:
                opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default,
                                   show_default=True, help=meta["help"])
            else:
                ctype = click.Choice(meta["choices"]) if meta.get("choices") else _scalar_type(f)
                opt = click.option(flag, f.name, type=ctype, default=f.default,
                                   show_default=f.default is not None, help=meta["help"])
            func = opt(func)
        return func
    return decorate


def make_config(cls, flags: dict):
    """The config dataclass `cls` from parsed flags (comma lists split and checked)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = flags.pop(f.name)
        if f.metadata.get("multiple"):
            v = comma_list(v, f.metadata["choices"], flag_name(f.name))
        values[f.name] = v
    cfg = cls(**values)
    cfg.validate()
    return cfg


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available else cpu (pipeline's one resolver); errors name --device."""
    try:
        return _resolve_device(device)
    except CnmError as e:
        raise CnmError(f"--device: {e}") from None


# --dtype of the views: the short names of pipeline.ops' dtypes that the benchmarks offer
DTYPES = {name: OUT_DTYPES[name] for name in ("bf16", "fp16", "fp32")}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto -> bf16 on CUDA, fp32 elsewhere; else DTYPES[name]."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------- rows


class Unavailable(Exception):
    """A row cannot run here (missing back-end, wrong device); the message says why."""


@dataclass
class Workload:
    """A row ready to time: `step()` does one unit of work (a batch, a train step), returns B."""

    step: Callable[[], int]
    close: Callable[[], None] = lambda: None
    bytes_per_image: float | None = None   # memory traffic per image (the op: bandwidth)
    batch_size: int | None = None          # images per step when not the run's --batch-size
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable
    description: str


class Registry:
    """Named row builders in registration (= table) order; `register` is a decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str = "") -> Callable:
        def add(build: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, build, description)
            return build
        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def builders(self) -> dict[str, Callable]:
        return {n: e.build for n, e in self._entries.items()}

    def description(self, name: str) -> str:
        entry = self._entries.get(name)
        return entry.description if entry else ""

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]


def one_line(e: BaseException) -> str:
    """The first line of an error; for errors re-raised from a worker (torch DataLoader puts the
    worker's traceback in the message) also the original error, its last line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return e.__class__.__name__
    if len(lines) > 1 and any("Traceback" in ln for ln in lines):
        return f"{lines[0]} {lines[-1]}"
    return lines[0]


def round_or_none(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


# ----------------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Raw outcome of `time_repeats`: per repeat, the units of work done and the seconds taken."""

    items: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for all queued work on `device` (no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_repeats(step: Callable[[], int], *, warmup: int, per_repeat: int, repeats: int,
                 sync: Callable[[], None], clock: Clock = time.perf_counter) -> Timings:
    """Time `repeats` regions of `per_repeat` calls of `step` after `warmup` untimed calls.

    step: does one unit (a batch, a train step) and returns how many items it delivered
          (images of the batch; the P views of a sample count as one image).
    sync: waits for the device; called after the warm-up and at the end of every region, so every
          region starts and ends with an idle device.
    clock: seconds, monotonic (time.perf_counter); injected by tests.
    """
    if per_repeat < 1 or repeats < 1 or warmup < 0:
        raise ValueError("time_repeats: per_repeat and repeats must be >= 1, warmup >= 0")
    out = Timings()
    t0 = clock()
    for _ in range(warmup):
        step()
    sync()
    out.warmup_seconds = clock() - t0
    for _ in range(repeats):
        start = clock()
        n = 0
        for _ in range(per_repeat):
            n += int(step())
        sync()
        out.seconds.append(clock() - start)
        out.items.append(n)
    return out


def calibrate(step: Callable[[], int], sync: Callable[[], None], target_s: float, *,
              clock: Clock = time.perf_counter, probe_s: float = 0.25,
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


@dataclass
class Measurement:
    """What `measure` saw: the timed regions, their size, the warm-up and the memory peaks."""

    timings: Timings
    steps: int
    warmup: int
    warmup_seconds: float
    memory: PeakMemory
    bytes_per_image: float | None
    notes: dict


class NotBuilt(Exception):
    """`measure` could not build the row's workload; the message is the row's reason."""


def measure(build: Callable[[], Workload], *, device: torch.device, warmup: int, repeats: int,
            steps: int | Callable[[Workload], int | None] | None, seconds: float,
            clock: Clock = time.perf_counter, sync: Callable[[], None] | None = None) -> Measurement:
    """Build one workload, warm it up, time `repeats` regions of `steps` steps, close it.

    steps: steps per region, or a function of the built workload giving them (e.g. from its own
           batch size); None: `calibrate` regions to last about `seconds`.
    A build that raises Unavailable/CnmError/ImportError raises NotBuilt(its first line); any
    other build error raises NotBuilt("failed to start: Class: first line"). Errors while timing
    propagate (see `guarded`). Memory left by the row is released before returning.
    """
    sync = sync or device_sync(device)
    workload = None
    mem = PeakMemory(device)
    try:
        with mem:
            try:
                workload = build()
            except (Unavailable, CnmError, ImportError) as e:
                raise NotBuilt(one_line(e)) from None
            except Exception as e:  # a back-end that cannot start here (e.g. DALI without a GPU)
                raise NotBuilt(f"failed to start: {e.__class__.__name__}: {one_line(e)}") from None
            n = steps(workload) if callable(steps) else steps
            t0 = clock()
            for _ in range(warmup):
                workload.step()
            sync()
            warm = clock() - t0
            if n is None:
                n = calibrate(workload.step, sync, seconds, clock=clock)
            timings = time_repeats(workload.step, warmup=0, per_repeat=n, repeats=repeats,
                                   sync=sync, clock=clock)
        return Measurement(timings=timings, steps=n, warmup=warmup, warmup_seconds=warm, memory=mem,
                           bytes_per_image=workload.bytes_per_image, notes=dict(workload.notes))
    finally:
        if workload is not None:
            with contextlib.suppress(Exception):
                workload.close()
        workload = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def timing_row(m: Measurement, *, unit: str) -> dict:
    """The figures every timed row has; `unit` ("batches" | "steps") names the per-region count."""
    mem = m.memory
    return {
        "images_per_s": stats.summarize(stats.rates(m.timings.items, m.timings.seconds)),
        "peak_host_mb": round_or_none(mem.peak_host_mb),
        "peak_device_mb": round_or_none(mem.peak_device_mb),
        "peak_device_growth_mb": round_or_none(mem.peak_device_growth_mb),
        "host_memory_method": mem.host_method,
        "torch_threads": torch.get_num_threads(),
        "repeats": len(m.timings.seconds),
        f"{unit}_per_repeat": m.steps,
        "images_per_repeat": m.timings.items,
        "seconds_per_repeat": [round(s, 6) for s in m.timings.seconds],
        f"warmup_{unit}": m.warmup,
        "warmup_seconds": round(m.warmup_seconds, 6),
    }


def guarded(run: Callable[[], dict], unavailable: Callable[[str], dict]) -> dict:
    """`run()`, with a failure turned into `unavailable(reason)` ("failed while running: ...");
    an unexpected exception also marks the row `failed` (one broken back-end must not lose the
    other rows' figures)."""
    try:
        return run()
    except NotBuilt as e:
        return unavailable(str(e))
    except (CnmError, ImportError, Unavailable) as e:
        return unavailable(f"failed while running: {one_line(e)}")
    except Exception as e:
        return unavailable(f"failed while running: {e.__class__.__name__}: {one_line(e)}") | {"failed": True}


def add_ratios(results: list[dict], *, key: str, baseline: str, field: str) -> None:
    """Set `field` of every available row to its median images/s / the baseline row's median."""
    base = next((r for r in results if r.get(key) == baseline and r["available"]), None)
    base_median = base["images_per_s"]["median"] if base else None
    for r in results:
        if r["available"]:
            r[field] = stats.ratio(r["images_per_s"]["median"], base_median)


# ----------------------------------------------------------------------------- memory


def _psutil():
    try:
        import psutil  # optional: not a core dependency
    except Exception:
        return None
    return psutil


def host_rss_bytes() -> int | None:
    """Resident set size of this process plus all its descendants (psutil), or None without it.

    Shared pages (e.g. a dataset mapped by forked loader workers) are counted once per process,
    so this over-states the physical footprint of multi-process loaders; it is what `top` shows.
    """
    ps = _psutil()
    if ps is None:
        return None
    try:
        me = ps.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                pass
        return total
    except Exception:
        return None


def lifetime_maxrss_bytes() -> int:
    """Peak RSS over the process lifetime (self) plus the largest reaped child (getrusage)."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) * unit


class PeakMemory:
    """Context manager measuring peak host and device memory inside its block.

    After the block: `peak_host_mb` (MiB), `host_method` ("psutil rss, self+children, sampled"
    or "ru_maxrss, process lifetime"), `peak_device_mb` (torch allocator peak, MiB; None on CPU),
    `peak_device_growth_mb` (peak growth of the device-wide used memory (cudaMemGetInfo) over its
    value on entry, MiB; None on CPU).
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.05):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_host_mb: float | None = None
        self.host_method = ""
        self.peak_device_mb: float | None = None
        self.peak_device_growth_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host_peak = 0
        self._dev_used_peak = 0
        self._dev_used_start: int | None = None

    def _sample(self) -> None:
        rss = host_rss_bytes()
        if rss is not None:
            self._host_peak = max(self._host_peak, rss)
        if self.device.type == "cuda":
            try:
                free, total = torch.cuda.mem_get_info(self.device)
                self._dev_used_peak = max(self._dev_used_peak, total - free)
            except Exception:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            self._dev_used_start = total - free
        self._sample()
        if _psutil() is not None or self.device.type == "cuda":
            self._thread = threading.Thread(target=self._run, name="cnm-bench-mem", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if _psutil() is not None and self._host_peak:
            self.peak_host_mb = self._host_peak / 2**20
            self.host_method = "psutil rss of self+children, sampled every %g s" % self.interval_s
        else:
            self.peak_host_mb = lifetime_maxrss_bytes() / 2**20
            self.host_method = "ru_maxrss of self+children, process lifetime"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_device_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            start = self._dev_used_start or 0
            self.peak_device_growth_mb = max(self._dev_used_peak - start, 0) / 2**20
