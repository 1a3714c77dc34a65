"""Epoch time of every loader: `python -m bench.loader_epoch [--device cpu|cuda] [--augment]`.

For a prepared 50k-image set (a synthetic one is written once to --data if it is missing) and
batch size 512, every loader is built, run for one warm-up epoch (FFCV compiles its pipeline,
DALI builds its, the cpu loader starts its workers, the numba/Triton augment kernels compile)
and then the loaders are timed round-robin, one epoch each per round, for --epochs rounds (so
load from other processes on a shared machine hits them alike); the table gives build time,
warm-up epoch, the median and the fastest timed epoch and images/s (at the median). The device is synchronised at the end of every epoch, so
asynchronous copies and kernels are paid for inside the epoch. With --augment every loader
yields Cut^nMix views for P peers (resident/ffcv/dali: the op on the device after loading,
dali also with its native graph where pipeline.ops.dali_graph exists; cpu: per-sample numpy in
its workers + mixing collate).

This is a measurement script, not a test. Results go to stdout (and --json PATH).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import harness, report
from pipeline import backends
from pipeline.data.manifest import load_manifest, write_dataset
from pipeline.environment import cpu_count, device_name
from pipeline.errors import CnmError
from pipeline.loaders import make_loader
from pipeline.ops import CutNMix

DEFAULT_DATA = Path(os.environ.get("TMPDIR", "/tmp")) / "cnm-bench-loader-50k"


def ensure_dataset(path: Path, n: int) -> Path:
    """A prepared synthetic set of n train images (random uint8, 10 classes) at `path`."""
    if (path / "manifest.json").exists():
        man = load_manifest(path)
        if man.counts.get("train") == n:
            return path
        raise CnmError(f"{path} holds {man.counts.get('train')} train images, not {n}; pass another --data")
    print(f"writing a synthetic prepared set of {n} images to {path} ...", file=sys.stderr)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    test = rng.integers(0, 256, size=(1000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=1000)
    write_dataset(path, {"train": (images, labels), "test": test}, dataset="synthetic-bench",
                  class_names=[str(i) for i in range(10)])
    return path


def configurations(device: str, augment: bool, workers: int | None):
    """(label, loader name, options) to time; back-ends that are not installed are skipped."""
    out = [("resident", "resident", {}), ("cpu", "cpu", {"num_workers": workers})]
    if backends.available("nvidia.dali"):
        out.append(("dali", "dali", {}))
        if augment:
            out.append(("dali native", "dali", {"native_augment": True}))
    if backends.available("ffcv"):
        out.append(("ffcv", "ffcv", {}))
    return out


def epoch_timer(device: torch.device):
    """one_epoch(loader) -> (seconds, images): one epoch timed by `harness.time_repeats` (one
    region of one step, the device synchronised before and after)."""
    sync = harness.device_sync(device)

    def one_epoch(loader) -> tuple[float, int]:
        def epoch() -> int:
            return sum(int(batch[1].shape[0]) for batch in loader)

        sync()
        t = harness.time_repeats(epoch, warmup=0, per_repeat=1, repeats=1, sync=sync)
        return t.seconds[0], t.items[0]

    return one_epoch


def time_round_robin(loaders: dict, epochs: int, device: torch.device) -> dict:
    """{label: timings}: one warm-up epoch each, then `epochs` rounds of one epoch per loader.

    Interleaving the loaders spreads load from other processes over all of them alike, which
    matters on a shared machine.
    """
    one_epoch = epoch_timer(device)
    out = {}
    for label, loader in loaders.items():
        warm, n = one_epoch(loader)
        out[label] = {"warmup_s": warm, "images": n, "epochs_s": []}
    for _ in range(epochs):
        for label, loader in loaders.items():
            out[label]["epochs_s"].append(one_epoch(loader)[0])
    for r in out.values():
        r["epoch_s"] = statistics.median(r["epochs_s"])
        r["epoch_min_s"] = min(r["epochs_s"])
        r["images_per_s"] = r["images"] / r["epoch_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prepared dir (synthetic one made if missing)")
    ap.add_argument("--n", type=int, default=50_000, help="train images of the synthetic set")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    ap.add_argument("--augment", action="store_true", help="also time every loader with Cut^nMix views")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="cpu loader workers (default: cores)")
    ap.add_argument("--only", nargs="*", help="labels to run (resident, cpu, dali, 'dali native', ffcv)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    try:
        device = harness.resolve_device(args.device)
        data = ensure_dataset(args.data, args.n)
    except CnmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    aug_modes = [False, True] if args.augment else [False]
    head = (f"loader epoch time: {args.n} images, batch {args.batch_size}, device {device}"
            f" ({device_name(device)}), {cpu_count()} cores, torch {torch.__version__}, {args.epochs} round-robin epochs after 1 warm-up")
    print(head)
    rows = []
    for with_aug in aug_modes:
        aug = None
        if with_aug:
            aug = CutNMix(peers=args.peers, out_dtype=torch.bfloat16)
        loaders, builds = {}, {}
        for label, name, opts in configurations(device.type, with_aug, args.workers):
            if args.only and label not in args.only:
                continue
            t0 = time.perf_counter()
            loaders[label] = make_loader(name, data, batch_size=args.batch_size, device=device, augment=aug, **opts)
            builds[label] = time.perf_counter() - t0
        results = time_round_robin(loaders, args.epochs, device)
        for label, loader in loaders.items():
            loader.close()
            r = results[label]
            row = {"loader": label, "augment": f"cutnmix P={args.peers}" if with_aug else "raw",
                   "build_s": builds[label], **r}
            rows.append(row)
            print(f"  {label:12s} {row['augment']:15s} build {row['build_s']:6.2f} s  warm-up {r['warmup_s']:7.2f} s  "
                  f"epoch {r['epoch_s']:7.3f} s (min {r['epoch_min_s']:.3f})  {r['images_per_s']:10.0f} img/s",
                  flush=True)
        del loaders
    print()
    print("| loader | batches | build s | warm-up epoch s | epoch s (median) | epoch s (min) | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['augment']} | {r['build_s']:.2f} | {r['warmup_s']:.2f} | "
              f"{r['epoch_s']:.3f} | {r['epoch_min_s']:.3f} | {r['images_per_s']:.0f} |")
    if args.json:
        report.write_json({"header": head, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
