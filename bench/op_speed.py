"""Speed of the Cut^nMix op (issue 3, Performance): `python -m bench.op_speed`.

CPU (always): B=512, P=3 by default. The per-sample numpy implementation of the same
augmentation (`pipeline.ops.numpy_baseline.numpy_cutnmix`: per-sample pad-crop-flip, per-sample
box pastes, batch normalise; what a competent user writes) against the vectorised paths:
the compiled numba kernel (what impl="auto" runs on a CPU), the pure-torch path, and the full
`CutNMix.__call__` (draw + apply). All get the same images and parameters; the medians of
`--repeats` timed runs after `--warmup` untimed ones.

CUDA (when available): the Triton kernel in bf16 for B in --cuda-batches (512..8192), samples/s
and achieved memory bandwidth (bytes that must move: B*H*W*3 uint8 read + P*B*H*W*3 output
written) against the device's datasheet peak (`bench.peaks`), and the vectorised torch path at
the largest batch for the triton/torch ratio. Timed with CUDA events, median of repeats.
Writes nothing unless --json PATH is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from pipeline.ops import CutNMix, cutnmix, draw_params, resolve_impl
from pipeline.ops.numpy_baseline import NumpyCutNMix, numpy_cutnmix

MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_time(fn, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_time(fn, repeats: int, warmup: int) -> float:
    """Median seconds of fn() measured with CUDA events (one event pair per run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cpu_rows(batch: int, peers: int, dtypes: list[str], repeats: int, warmup: int, mode: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    params = draw_params(batch, peers, 32, 32, mode=mode, generator=g)
    fast = resolve_impl("auto", torch.device("cpu"))
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        aug = CutNMix(peers=peers, mode=mode, out_dtype=dt, mean=MEAN, std=STD)
        base = NumpyCutNMix(aug)
        rng = np.random.default_rng(0)
        imgs_np = imgs.numpy()

        def loader_baseline():  # what the cpu loader does: sample() per image, then collate()
            views = np.stack([base.sample(im, rng) for im in imgs_np])
            return base.collate(views, labels.numpy(), rng)

        cases = [
            (
                "numpy per-sample (given params)",
                lambda: numpy_cutnmix(imgs, labels, params, mean=MEAN, std=STD, out_dtype=dt),
            ),
            ("numpy sample()+collate() (cpu loader)", loader_baseline),
            (
                "torch vectorised",
                lambda: cutnmix(imgs, labels, params, mean=MEAN, std=STD, out_dtype=dt, impl="torch"),
            ),
        ]
        if fast == "numba":
            cases.append(
                (
                    "numba kernel (auto on CPU)",
                    lambda: cutnmix(imgs, labels, params, mean=MEAN, std=STD, out_dtype=dt, impl="numba"),
                )
            )
        cases.append((f"CutNMix() draw+apply ({fast})", lambda: aug(imgs, labels, generator=g)))
        baseline_s = None
        for label, fn in cases:
            s = cpu_time(fn, repeats, warmup)
            if baseline_s is None:
                baseline_s = s
            rows.append(
                dict(
                    device="cpu",
                    impl=label,
                    dtype=name,
                    batch=batch,
                    peers=peers,
                    ms=s * 1e3,
                    samples_per_s=batch / s,
                    speedup_vs_numpy=baseline_s / s,
                )
            )
    return rows


def cuda_rows(
    batches: list[int], peers: int, repeats: int, warmup: int, mode: str
) -> tuple[list[dict], dict]:
    from bench.peaks import lookup

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = lookup(name)
    peak_gbps = peak[0] if peak else None
    impl = resolve_impl("auto", dev)
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for b in batches:
        imgs = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, device=dev, generator=g)
        labels = torch.randint(0, 10, (b,), device=dev, generator=g)
        params = draw_params(b, peers, 32, 32, mode=mode, generator=g, device=dev)
        impls = [impl] + (["torch"] if b == max(batches) and impl != "torch" else [])
        for which in impls:
            s = cuda_time(
                lambda: cutnmix(
                    imgs, labels, params, mean=MEAN, std=STD, out_dtype=torch.bfloat16, impl=which
                ),
                repeats,
                warmup,
            )
            moved = b * 32 * 32 * 3 * (1 + peers * 2)  # uint8 in + P bf16 views out
            gbps = moved / s / 1e9
            rows.append(
                dict(
                    device=name,
                    impl=which,
                    dtype="bf16",
                    batch=b,
                    peers=peers,
                    ms=s * 1e3,
                    samples_per_s=b / s,
                    gbps=gbps,
                    pct_peak=(100 * gbps / peak_gbps) if peak_gbps else None,
                )
            )
        aug = CutNMix(peers=peers, mode=mode, out_dtype=torch.bfloat16)
        s = cuda_time(lambda: aug(imgs, labels, generator=g), repeats, warmup)
        rows.append(
            dict(
                device=name,
                impl=f"CutNMix() draw+apply ({impl})",
                dtype="bf16",
                batch=b,
                peers=peers,
                ms=s * 1e3,
                samples_per_s=b / s,
                gbps=None,
                pct_peak=None,
            )
        )
    big = [r for r in rows if r["batch"] == max(batches) and r["impl"] in (impl, "torch")]
    ratio = None
    if len(big) == 2:
        ratio = big[1]["ms"] / big[0]["ms"]
    return rows, dict(
        device=name,
        peak_gbps=peak_gbps,
        peak_label=peak[1] if peak else None,
        triton_over_torch_at_max_batch=ratio,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.op_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--mode", default="cutnmix")
    ap.add_argument("--dtypes", default="fp32,bf16", help="CPU output dtypes, comma-separated")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cuda-batches", default="512,1024,2048,4096,8192")
    ap.add_argument("--cuda-repeats", type=int, default=50)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and numba (default: their own defaults)",
    )
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except Exception:
            pass

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except Exception:
        pass
    print("Cut^nMix op speed", json.dumps(info))
    results: dict = dict(info=info, cpu=[], cuda=[], cuda_summary=None)

    if not args.no_cpu:
        rows = cpu_rows(args.batch, args.peers, args.dtypes.split(","), args.repeats, args.warmup, args.mode)
        results["cpu"] = rows
        print(f"\nCPU, B={args.batch}, P={args.peers}, mode={args.mode}, median of {args.repeats}")
        print(f"{'implementation':42s} {'dtype':5s} {'ms/batch':>9s} {'samples/s':>11s} {'vs numpy':>9s}")
        for r in rows:
            rate, gain = r["samples_per_s"], r["speedup_vs_numpy"]
            print(f"{r['impl']:42s} {r['dtype']:5s} {r['ms']:9.2f} {rate:11,.0f} {gain:8.1f}x")

    if torch.cuda.is_available():
        batches = [int(b) for b in args.cuda_batches.split(",")]
        rows, summary = cuda_rows(batches, args.peers, args.cuda_repeats, 5, args.mode)
        results["cuda"], results["cuda_summary"] = rows, summary
        peak = (
            f"{summary['peak_gbps']:.0f} GB/s ({summary['peak_label']})"
            if summary["peak_gbps"]
            else "unknown"
        )
        print(
            f"\nCUDA {summary['device']}, peak {peak}, P={args.peers}, bf16, CUDA events, "
            f"median of {args.cuda_repeats}"
        )
        print(
            f"{'implementation':34s} {'batch':>6s} {'ms':>8s} {'samples/s':>13s} {'GB/s':>8s} {'% peak':>7s}"
        )
        for r in rows:
            gb = f"{r['gbps']:8.0f}" if r["gbps"] else f"{'':8s}"
            pct = f"{r['pct_peak']:6.1f}%" if r["pct_peak"] else f"{'':7s}"
            print(f"{r['impl']:34s} {r['batch']:6d} {r['ms']:8.3f} {r['samples_per_s']:13,.0f} {gb} {pct}")
        if summary["triton_over_torch_at_max_batch"]:
            print(f"triton vs torch at B={max(batches)}: {summary['triton_over_torch_at_max_batch']:.1f}x")
    else:
        print("\nno CUDA device: the GPU section (Triton bandwidth, triton vs torch) was skipped")

    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
