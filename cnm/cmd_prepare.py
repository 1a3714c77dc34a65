"""`cnm prepare`: CLI wiring for `pipeline.data.prepare`."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import click


def _say(msg: str) -> None:
    click.echo(msg)


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`kill`, a job scheduler) unwinds like Ctrl-C, so the atomic writers clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", required=True, type=click.Choice(["cifar10", "cifar100", "synthetic"]),
              help="Which data set to prepare.")
@click.option("--source", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="The official python release: cifar-10-python.tar.gz / cifar-100-python.tar.gz, "
                   "or its extracted folder (cifar10/cifar100).")
@click.option("--download", is_flag=True,
              help="Fetch the official tarball (MD5 checked, cached in $CNM_CACHE_DIR or ~/.cache/cnm).")
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Output directory [default: data/<dataset>].")
@click.option("--force", is_flag=True, help="Replace an existing prepared directory.")
@click.option("--lenient", is_flag=True,
              help="Accept counts other than the official 50000/10000 (custom sets in the CIFAR layout).")
@click.option("--num-classes", type=int, default=None, help="synthetic: number of classes [10].")
@click.option("--train-size", type=int, default=None, help="synthetic: training images [5000].")
@click.option("--test-size", type=int, default=None, help="synthetic: test images [1000].")
@click.option("--seed", type=int, default=None, help="synthetic: generator seed [0].")
@click.option("--difficulty", type=float, default=None,
              help="synthetic: 0..1, how confusable the classes are (0: the default set; 1: two "
                   "ResNet-20 peers stay well below 100%) [0].")
@click.option("--object-scale", type=float, default=None,
              help="synthetic: 0.5..2, the object's radius relative to the default set (about 1.4 "
                   "covers a CIFAR-like share of the frame) [1].")
@click.option("--no-beton", is_flag=True, help="Skip the FFCV .beton files even when ffcv is installed.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Where --download keeps the tarball [$CNM_CACHE_DIR or ~/.cache/cnm].")
def prepare(dataset, source, download, out, force, lenient, num_classes, train_size, test_size, seed,
            difficulty, object_scale, no_beton, cache_dir):
    """Verify CIFAR-10/100 (or generate the synthetic set) and write the prepared directory:
    {train,test}_{images,labels}.npy, train.beton/test.beton (FFCV) and manifest.json.

    \b
    cnm prepare --dataset cifar100 --download --out data/cifar100
    cnm prepare --dataset cifar10 --source ~/cifar-10-python.tar.gz
    cnm prepare --dataset synthetic --num-classes 10 --train-size 5000 --out data/synthetic
    cnm prepare --dataset synthetic --difficulty 1 --out data/synthetic-hard
    """
    from pipeline.data.prepare import prepare as run_prepare

    with _terminate_as_interrupt():
        res = run_prepare(dataset, out, source=source, download=download, force=force, lenient=lenient,
                          beton=False if no_beton else None, num_classes=num_classes, train_size=train_size,
                          test_size=test_size, seed=seed, difficulty=difficulty, object_scale=object_scale,
                          cache_dir=cache_dir, say=_say, warn=_warn)
    man = res.manifest
    total = sum(f["bytes"] for f in man.files.values())
    counts = " + ".join(f"{n} {split}" for split, n in man.counts.items())
    if res.status == "up-to-date":
        click.echo(f"{man.root}: up to date ({man.dataset}, {counts} images); verified {len(man.files)} "
                   f"files by sha256 in {res.seconds:.1f} s")
        return
    click.echo(f"prepared {man.dataset} in {man.root} ({res.seconds:.1f} s): {counts} images, "
               f"{man.num_classes} classes, {_size(total)}")
    for name, meta in sorted(man.files.items()):
        click.echo(f"  {name:<28} {_size(meta['bytes']):>10}")
    mean = ", ".join(f"{v:.1f}" for v in man.mean)
    std = ", ".join(f"{v:.1f}" for v in man.std)
    click.echo(f"  channel mean ({mean}), std ({std}) in pixel units")
