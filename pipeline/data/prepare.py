"""`cnm prepare`: turn a CIFAR release (or the synthetic set) into a prepared directory.

    prepare("cifar100", "data/cifar100", source="cifar-100-python.tar.gz")
    prepare("cifar10", "data/cifar10", download=True)
    prepare("synthetic", "data/synthetic", num_classes=10, train_size=5000, test_size=1000, seed=0,
            difficulty=0.0, object_scale=1.0)

The output format is `pipeline.data.manifest` (npy arrays, FFCV betons when ffcv is installed,
manifest.json with checksums and the source's identity). The write is atomic
(`manifest.write_dataset`): an error or Ctrl-C leaves no partial directory. An existing output
is left alone without `force`; if it was made from the same source (same dataset and source
content: tarball sha256, member-file sha256s, or synthetic parameters) it is only verified
against its checksums and reported up to date.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import cifar, synthetic
from pipeline.data import download as downloads
from pipeline.data.manifest import Manifest, load_manifest, os_error_reason, replaceable, write_dataset
from pipeline.errors import CnmError

DATASETS = ("cifar10", "cifar100", "synthetic")
SYNTHETIC_DEFAULTS = {"num_classes": 10, "train_size": 5000, "test_size": 1000, "seed": 0, "difficulty": 0.0,
                      "object_scale": 1.0}


@dataclass
class PrepareResult:
    manifest: Manifest
    status: str  # "written" | "up-to-date"
    seconds: float
    warnings: list[str] = field(default_factory=list)


def check_options(dataset: str, *, source, download: bool, lenient: bool, synthetic_params: dict) -> None:
    """One-line CnmError for every impossible flag combination."""
    if dataset not in DATASETS:
        raise CnmError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    given = [f"--{k.replace('_', '-')}" for k, v in synthetic_params.items() if v is not None]
    if dataset == "synthetic":
        bad = (["--source"] if source is not None else []) + (["--download"] if download else []) + \
              (["--lenient"] if lenient else [])
        if bad:
            raise CnmError(f"{' and '.join(bad)} cannot be used with --dataset synthetic (it is generated, "
                           f"not read); see --num-classes, --train-size, --test-size, --seed, --difficulty, "
                           f"--object-scale")
        return
    if given:
        raise CnmError(f"{', '.join(given)} only apply to --dataset synthetic")
    if source is not None and download:
        raise CnmError("give either --source PATH or --download, not both")
    if source is None and not download:
        raise CnmError(f"--dataset {dataset} needs --source PATH (the official "
                       f"{cifar.LAYOUTS[dataset].tarball} or its extracted folder) or --download")


def synthetic_knobs(params: dict) -> str:
    """", difficulty 0.4, object scale 1.4" for the knobs that are not at their default."""
    return "".join(f", {k.replace('_', ' ')} {params[k]}" for k in ("difficulty", "object_scale")
                   if params.get(k) is not None and params[k] != SYNTHETIC_DEFAULTS[k])


def describe_source(src: dict) -> str:
    kind = src.get("kind")
    if kind == "synthetic":
        hard = synthetic_knobs(src)
        return (f"synthetic generator {src.get('generator')} (classes {src.get('num_classes')}, train "
                f"{src.get('train_size')}, test {src.get('test_size')}, seed {src.get('seed')}{hard})")
    if kind in ("tarball", "folder"):
        return f"{src.get('name')} ({kind})"
    return "an unknown source"


def prepare(dataset: str, out: str | os.PathLike | None = None, *, source: str | os.PathLike | None = None,
            download: bool = False, force: bool = False, lenient: bool = False, beton: bool | None = None,
            num_classes: int | None = None, train_size: int | None = None, test_size: int | None = None,
            seed: int | None = None, difficulty: float | None = None, object_scale: float | None = None,
            cache_dir: str | os.PathLike | None = None, url: str | None = None,
            progress: bool = True, say: Callable[[str], None] | None = None,
            warn: Callable[[str], None] | None = None) -> PrepareResult:
    """Prepare `dataset` into `out` (default `data/<dataset>`); see the module docstring.

    beton: write FFCV files (None: when ffcv is installed, else a warning; True: require ffcv).
    say / warn: callables for progress lines and warnings (default: silent).
    """
    t0 = time.perf_counter()
    say = say or (lambda msg: None)
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    params = {"num_classes": num_classes, "train_size": train_size, "test_size": test_size, "seed": seed,
              "difficulty": difficulty, "object_scale": object_scale}
    check_options(dataset, source=source, download=download, lenient=lenient, synthetic_params=params)
    out = Path(os.path.abspath(out if out is not None else Path("data") / dataset))
    if dataset == "synthetic":
        params = {k: (SYNTHETIC_DEFAULTS[k] if v is None else type(SYNTHETIC_DEFAULTS[k])(v))
                  for k, v in params.items()}
        synthetic.check_params(**params)
    if beton:
        from pipeline.backends import require

        require("ffcv", "writing .beton files")

    # what the output would be made from, known before any heavy work
    if dataset == "synthetic":
        identity = synthetic.source_identity(**params)
    elif source is not None:
        identity = cifar.source_identity(dataset, source)
    else:
        identity = None  # --download: the official tarball, identified by its published MD5

    replace = force
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            replace = True  # an empty directory (e.g. made by hand) is filled in
        elif not force:
            return _up_to_date(out, dataset, identity, say, t0, warnings)
        elif not replaceable(out):
            raise CnmError(f"{out}: exists and is not a `cnm prepare` output (no manifest.json); refusing "
                           f"to replace it even with --force: choose another --out")
    _check_writable(out)

    extra_labels: dict = {}
    if dataset == "synthetic":
        say(f"generating the synthetic set: {params['num_classes']} classes, {params['train_size']} train + "
            f"{params['test_size']} test images, seed {params['seed']}"
            + synthetic_knobs(params))
        splits = synthetic.make_synthetic(**params)
        class_names = synthetic.class_names(params["num_classes"])
    else:
        path = Path(source) if source is not None else None
        if download:
            path = downloads.fetch(dataset, url=url, cache_dir=cache_dir, progress=progress, say=say, out=out)
            identity = {**cifar.source_identity(dataset, path), "url": url or downloads.official_url(dataset)}
        say(f"reading and verifying {path}")
        release = cifar.read_cifar(dataset, path, lenient=lenient, warn=_warn, identity=identity)
        splits, class_names, extra_labels = release.splits, release.class_names, release.extra_labels
        identity = {**release.source, "lenient": lenient}
        if release.warnings:
            identity["warnings"] = list(release.warnings)

    if beton is None:  # decided only now: importing ffcv takes seconds, a bad source fails faster
        from pipeline.backends import available

        beton = available("ffcv")
        if not beton:
            _warn("ffcv is not installed: writing the .npy arrays only, no .beton files (the ffcv loader "
                  "cannot read this directory); pip install 'cnm[ffcv]' and re-run with --force to add them")
    manifest = write_dataset(out, splits, dataset=dataset, class_names=class_names, extra_labels=extra_labels,
                             source=identity, force=replace, beton=beton, progress=say)
    return PrepareResult(manifest, "written", time.perf_counter() - t0, warnings)


def _up_to_date(out: Path, dataset: str, identity: dict | None, say, t0: float, warnings: list) -> PrepareResult:
    """An existing output without --force: verify it if it matches the request, else refuse."""
    if not (out / "manifest.json").is_file():
        raise CnmError(f"{out}: already exists and is not a `cnm prepare` output; choose another --out")
    try:
        man = load_manifest(out)
    except CnmError as e:
        raise CnmError(f"{out}: already exists, with an unreadable manifest ({e}); pass --force to replace it") \
            from None
    recorded = man.source or {}
    if identity is None:  # --download
        same = (man.dataset == dataset and recorded.get("kind") == "tarball"
                and recorded.get("md5") == downloads.expected_md5(dataset))
    else:
        same = man.dataset == dataset and cifar.same_source(recorded, identity)
    if not same:
        raise CnmError(f"{out}: already exists, prepared from {man.dataset} {describe_source(recorded)}; "
                       f"pass --force to replace it")
    say(f"{out}: already prepared from this source; verifying checksums")
    man.verify()
    return PrepareResult(man, "up-to-date", time.perf_counter() - t0, warnings)


def _check_writable(out: Path) -> None:
    """Fail before any heavy work when no directory can be made next to `out`: probe by making
    (and removing) a temporary directory in the nearest existing ancestor. Permission bits
    alone do not tell (root ignores them; /sys refuses even root)."""
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CnmError(f"{out}: cannot create the output directory ({probe} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cnm-probe-", dir=probe))
    except OSError as e:
        raise CnmError(f"{out}: cannot create the output directory ({os_error_reason(e)} in {probe})") from None
