"""The Cut^nMix op alone, timed honestly: `python -m bench.op_speed` (= `cnm bench op`).

A ~5 us kernel cannot be timed by one event pair around one call: launch and Python overhead
(20-40 us) would land inside it. Every row here times `launches` back-to-back calls between two
device synchronisations (`bench.harness.time_repeats`; the count is calibrated to --seconds), and
on CUDA also the same call captured once in a CUDA graph and replayed back to back. Rows per
batch size B and implementation (`--impls`; auto = triton on CUDA, numba on CPU):

- `kernel`       `cutnmix(images, labels, params)` on fixed parameters drawn once;
- `draw+kernel`  `CutNMix(...)(images, labels)`: the parameter draw and the kernel.

Bytes per call (`stats.op_bytes`): the uint8 source read once, the partners' box pixels read by
every view (`stats.partner_pixels`, counted from the fixed parameters) and the P views written;
GB/s and % of the device's peak (`bench.peaks.reference_peak`: datasheet, else the measured copy
bandwidth of the same device). `--sweep`: B = 512, 1024, ... 262144 on CUDA (64 ... 1024 on a
CPU; --min-batch/--max-batch change the range). See docs/performance.md#the-op.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass

import click
import torch
from rich.console import Console

from bench import harness, peaks, report, stats
from bench.harness import Workload, option
from pipeline.environment import load_average, run_environment
from pipeline.errors import CnmError
from pipeline.ops import CIFAR10_MEAN, CIFAR10_STD, MODES, CutNMix, cutnmix, draw_params, resolve_impl
from pipeline.ops import IMPLS as OP_IMPLS
from pipeline.ops.numpy_baseline import numpy_cutnmix

IMPLS = (*(i for i in OP_IMPLS if i != "reference"), "numpy")  # the op's, and the numpy baseline
SWEEP = {"cuda": (512, 262144), "cpu": (64, 1024)}
UNIT = ("images/s: samples per second with all P views written (back-to-back calls); "
        "GB/s: bytes per call (source + partner box reads + views) / seconds per call")


@dataclass
class OpSpeedConfig:
    """Settings of one `cnm bench op` run; each field is one flag."""

    device: str = option("auto", "auto | cuda | cuda:N | cpu")
    peers: int = option(3, "views per sample (P)")
    mode: str = option("cutnmix", "mixing mode", MODES)
    dtype: str = option("auto", "dtype of the views (auto: bf16 on CUDA, fp32 on CPU)", ("auto", *harness.DTYPES))
    impls: tuple[str, ...] = option(("auto", "torch"), "comma list of implementations to time "
                                    "(numpy: the per-sample reference, CPU only)", IMPLS, multiple=True)
    batch_size: int = option(512, "B without --sweep")
    sweep: bool = option(False, "time every power of two B from --min-batch to --max-batch")
    min_batch: int | None = option(None, "smallest B of --sweep (default 512 on CUDA, 64 on CPU)")
    max_batch: int | None = option(None, "largest B of --sweep (default 262144 on CUDA, 1024 on CPU)")
    graph: bool = option(True, "also time the call captured in a CUDA graph (CUDA only)")
    repeats: int = option(5, "timed regions per row")
    launches: int | None = option(None, "back-to-back calls per timed region (default: sized by "
                                  "--seconds)")
    seconds: float = option(0.2, "without --launches: size each timed region to last about this long")
    warmup: int = option(3, "untimed calls first")
    peak_gbps: float | None = option(None, "peak memory bandwidth in GB/s (default: datasheet value "
                                     "by device name, else the measured copy bandwidth)")
    seed: int = option(0, "random seed")

    def validate(self) -> None:
        harness.check_choices(self)
        for name in ("peers", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise CnmError(f"{harness.flag_name(name)} must be >= 1")
        for name in ("min_batch", "max_batch", "launches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CnmError(f"{harness.flag_name(name)} must be >= 1")
        if self.warmup < 0:
            raise CnmError("--warmup must be >= 0")
        if not self.seconds > 0:
            raise CnmError("--seconds must be > 0")
        if self.peak_gbps is not None and not self.peak_gbps > 0:
            raise CnmError("--peak-gbps must be > 0")

    def batches(self, device: torch.device) -> list[int]:
        """The batch sizes to time on `device`."""
        if not self.sweep:
            return [self.batch_size]
        lo, hi = SWEEP[device.type]
        lo, hi = self.min_batch or lo, self.max_batch or hi
        if lo > hi:
            raise CnmError(f"--min-batch {lo} is above --max-batch {hi}")
        out, b = [], lo
        while b <= hi:
            out.append(b)
            b *= 2
        return out


def _calls(cfg: OpSpeedConfig, device: torch.device, b: int, impl: str, out_dtype: torch.dtype):
    """{"kernel": fn, "draw+kernel": fn | None} of one B and implementation, and the bytes per call."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    images = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(0, 10, (b,), device=device, generator=g)
    params = draw_params(b, cfg.peers, 32, 32, mode=cfg.mode, generator=g, device=device)
    norm = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "out_dtype": out_dtype}
    pixels = stats.partner_pixels(cfg.mode, (params.box_h * params.box_w).tolist(),
                                  int(params.mixed.sum()), cfg.peers, 32, 32)
    moved = stats.op_bytes(b, 32, 32, cfg.peers, torch.empty((), dtype=out_dtype).element_size(),
                           partner_pixels=pixels)
    if impl == "numpy":
        if device.type != "cpu":
            raise harness.Unavailable("the numpy reference runs on CPU tensors only")
        return {"kernel": lambda: numpy_cutnmix(images, labels, params, **norm), "draw+kernel": None}, moved
    aug = CutNMix(peers=cfg.peers, mode=cfg.mode, impl=impl, **norm)
    return {"kernel": lambda: cutnmix(images, labels, params, impl=impl, **norm),
            "draw+kernel": lambda: aug(images, labels)}, moved


def _graphed(fn, device: torch.device):
    """`fn` captured once in a CUDA graph (after a side-stream warm-up); returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _row(name: str, b: int, impl: str, what: str, timing: str, reason: str | None = None) -> dict:
    return {"pipeline": name, "available": reason is None, "batch": b, "impl": impl, "call": what,
            "timing": timing, **({"reason": reason} if reason else {}),
            "images_per_s": None, "peak_host_mb": None, "peak_device_mb": None}


def time_call(cfg: OpSpeedConfig, device: torch.device, fn, *, b: int, bytes_per_call: int,
              peak: tuple[float, str], clock: harness.Clock = time.perf_counter) -> dict:
    """The figures of one call timed back to back (`harness.measure`): images/s, us per call,
    GB/s and the fraction of `peak`."""
    def step() -> int:
        fn()
        return b

    m = harness.measure(lambda: Workload(step=step), device=device, warmup=cfg.warmup,
                        repeats=cfg.repeats, steps=cfg.launches, seconds=cfg.seconds, clock=clock)
    row = harness.timing_row(m, unit="launches")
    ips = row["images_per_s"]
    row["us_per_call"] = {k: 1e6 * b / v for k, v in ips.items()}
    row["bytes_per_call"] = bytes_per_call
    row["bandwidth_gbps"] = {k: v * bytes_per_call / b / 1e9 for k, v in ips.items()}
    row["peak_gbps"], row["peak_source"] = peak
    row["fraction_of_peak"] = stats.fraction_of_peak(row["bandwidth_gbps"]["median"], peak[0])
    return row


def run_op_bench(cfg: OpSpeedConfig, *, progress=None, clock: harness.Clock = time.perf_counter,
                 copy_bytes: int = 1 << 28) -> dict:
    """Every (B, implementation, kernel | draw+kernel, back-to-back | graph) row; the JSON document.

    copy_bytes: buffer of the copy-bandwidth measurement when the device has no datasheet peak.
    """
    cfg.validate()
    say = progress or (lambda msg: None)
    device = harness.resolve_device(cfg.device)
    out_dtype = harness.resolve_dtype(cfg.dtype, device)
    env = run_environment(device)
    batches = cfg.batches(device)
    say(f"reference peak of {env['device_name']}")
    peak = peaks.reference_peak(device, cfg.peak_gbps, copy_bytes=copy_bytes)
    timings = ["back-to-back"] + (["cuda-graph"] if cfg.graph and device.type == "cuda" else [])
    results = []
    for b in batches:
        seen = set()
        for impl_name in cfg.impls:
            try:
                impl = impl_name if impl_name == "numpy" else resolve_impl(impl_name, device)
                if impl in seen:  # auto is one of the others
                    continue
                seen.add(impl)
                calls, moved = _calls(cfg, device, b, impl, out_dtype)
            except (CnmError, harness.Unavailable) as e:
                results.append(_row(f"{impl_name} kernel", b, impl_name, "kernel", "back-to-back",
                                    harness.one_line(e)))
                continue
            for what, fn in calls.items():
                for timing in timings:
                    name = f"{impl} {what}" + (" (graph)" if timing == "cuda-graph" else "")
                    if fn is None:  # the numpy reference has no draw of its own: no row
                        continue
                    say(f"B={b}: timing {name}")

                    def run(fn=fn, timing=timing, b=b, moved=moved) -> dict:
                        call = _graphed(fn, device) if timing == "cuda-graph" else fn
                        return time_call(cfg, device, call, b=b, bytes_per_call=moved, peak=peak,
                                         clock=clock)

                    row = _row(name, b, impl, what, timing) | harness.guarded(
                        run, lambda reason: {"available": False, "reason": reason})
                    results.append(row)
            del calls
    _ratios_to_torch(results)
    config = asdict(cfg)
    config["impls"] = list(cfg.impls)
    config["device_resolved"] = str(device)
    config["dtype_resolved"] = str(out_dtype).replace("torch.", "")
    config["batches"] = batches
    return {"schema": "cnm-bench/1", "bench": "op", "unit": UNIT, "baseline": "torch",
            "env": env | {"load_average_end": load_average()}, "config": config,
            "peak": {"gbps": peak[0], "source": peak[1]}, "results": results}


def _ratios_to_torch(results: list[dict]) -> None:
    """`ratio_to_torch`: median images/s / the torch row's of the same B, call and timing."""
    for b in {r["batch"] for r in results}:
        same_b = [r for r in results if r["batch"] == b]
        for what in ("kernel", "draw+kernel"):
            for timing in ("back-to-back", "cuda-graph"):
                group = [r for r in same_b if r["call"] == what and r["timing"] == timing]
                harness.add_ratios(group, key="impl", baseline="torch", field="ratio_to_torch")


def run_cli(cfg: OpSpeedConfig, json_path: str | None) -> None:
    """Run, print the table (to stderr when the JSON goes to stdout), write --json."""
    to_stdout = json_path == "-"
    say = (lambda msg: click.echo(msg, err=True))
    doc = run_op_bench(cfg, progress=say)
    Console(stderr=to_stdout, width=160).print(report.table(doc))
    if to_stdout:
        click.echo(report.to_json(doc), nl=False)
    elif json_path:
        report.write_json(doc, json_path)
        click.echo(f"wrote {json_path}", err=True)


@click.command("op", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@harness.config_options(OpSpeedConfig)
@click.option("--json", "json_path", is_flag=False, flag_value="-", default=None,
              help="write the JSON document to this file; `--json` alone: to stdout (the table "
                   "then goes to stderr)")
def command(json_path, **flags):
    """The Cut^nMix op alone: back-to-back calls (and a captured CUDA graph) of the kernel, with
    and without the parameter draw; GB/s with the partner reads counted and % of the device's
    peak. Also `python -m bench.op_speed`."""
    run_cli(harness.make_config(OpSpeedConfig, flags), json_path)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.op_speed [FLAGS]`: exit status 0, or 1 with one `error:` line."""
    try:
        command.main(args=argv, prog_name="python -m bench.op_speed", standalone_mode=False)
    except CnmError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
