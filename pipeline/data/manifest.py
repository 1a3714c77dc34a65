"""The prepared-dataset format: what `cnm prepare` writes and every loader reads.

A prepared directory holds, for each split `s` in (train, test):

- `s_images.npy`  uint8 [N, 32, 32, 3] (HWC, RGB), npy format v1.0
- `s_labels.npy`  int64 [N]
- `s.beton`       FFCV file (`image`: RGBImageField raw, `label`: IntField); only when ffcv is
                  installed at prepare time (the manifest lists what exists)
- optional extra label sets (CIFAR-100's coarse labels): `s_<name>_labels.npy` int64 [N]

and `manifest.json` (FORMAT_VERSION below): dataset, num_classes, class names, counts,
per-channel mean/std in pixel units (0..255) of the train split, `extra_labels`, `formats`
({"npy": true, "beton": bool}), the sha256 and size of every file, and where the data came
from (`source`). `write_dataset` builds the directory under a temporary sibling name and
renames it into place, so a crash, a full disk or Ctrl-C leaves no partial output.
`load_manifest` checks everything a loader relies on and turns every fault into a one-line
`CnmError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import hashlib
import json
import math
import multiprocessing
import os
import queue
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.backends import available, require
from pipeline.errors import CnmError
from pipeline.fileio import host_tag, os_error_reason, pid_alive

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_SHAPE = (32, 32, 3)


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str, label_set: str | None = None) -> str:
    return f"{split}_labels.npy" if label_set is None else f"{split}_{label_set}_labels.npy"


def beton_file(split: str) -> str:
    return f"{split}.beton"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked `manifest.json` of a prepared directory."""

    root: Path
    dataset: str
    num_classes: int
    class_names: list[str]
    counts: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files: dict[str, dict]  # file name -> {"sha256": str, "bytes": int}
    source: dict = field(default_factory=dict)
    extra_labels: dict = field(default_factory=dict)  # name -> {"num_classes", "class_names"}
    raw: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return name in self.files

    def verify(self, names: Sequence[str] | None = None, *, checksums: bool = True) -> None:
        """Check that the named files (default: all) exist with their recorded size and sha256.

        Raises a one-line CnmError naming the first faulty file.
        """
        for name in names if names is not None else list(self.files):
            if name not in self.files:
                raise CnmError(f"{self.root}: {name} is not part of this prepared dataset "
                               f"(re-run `cnm prepare` to create it)")
            p = self.path(name)
            if not p.is_file():
                raise CnmError(f"{p}: file is missing from the prepared dataset; "
                               f"re-run `cnm prepare --force`")
            meta = self.files[name]
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise CnmError(f"{p}: size {size} does not match the manifest ({meta['bytes']}): "
                               f"the file is corrupt; re-run `cnm prepare --force`")
            if checksums and sha256_file(p) != meta["sha256"]:
                raise CnmError(f"{p}: sha256 does not match the manifest: the file is corrupt; "
                               f"re-run `cnm prepare --force`")

    def load_split(self, split: str, *, mmap: bool = True, verify: bool = True,
                   label_set: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [N,32,32,3], labels int64 [N]) of a split, checked against the manifest."""
        if split not in self.counts:
            raise CnmError(f"{self.root}: no split {split!r} (have: {', '.join(self.counts)})")
        names = [images_file(split), labels_file(split, label_set)]
        if verify:
            self.verify(names)
        try:
            images = np.load(self.path(names[0]), mmap_mode="r" if mmap else None, allow_pickle=False)
            labels = np.load(self.path(names[1]), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CnmError(f"{self.root}: cannot read {split} arrays: {e}") from None
        n = self.counts[split]
        if images.dtype != np.uint8 or images.shape != (n, *IMAGE_SHAPE):
            raise CnmError(f"{self.path(names[0])}: expected uint8 {(n, *IMAGE_SHAPE)}, "
                           f"found {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (n,):
            raise CnmError(f"{self.path(names[1])}: expected int64 ({n},), found {labels.dtype} {labels.shape}")
        self._check_label_range(labels, self.path(names[1]), label_set)
        return images, labels

    def check_labels(self, split: str, label_set: str | None = None) -> None:
        """Every label of `split` in [0, num_classes) (one read of the small labels file, checked
        against its sha256): a wrong label fails here, before any step, not as a device-side
        assert in the loss or a silently wrong test accuracy."""
        if split not in self.counts:
            raise CnmError(f"{self.root}: no split {split!r} (have: {', '.join(self.counts)})")
        name = labels_file(split, label_set)
        self.verify([name])
        try:
            labels = np.load(self.path(name), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CnmError(f"{self.path(name)}: cannot read the labels: {e}") from None
        if labels.dtype != np.int64 or labels.shape != (self.counts[split],):
            raise CnmError(f"{self.path(name)}: expected int64 ({self.counts[split]},), "
                           f"found {labels.dtype} {labels.shape}")
        self._check_label_range(labels, self.path(name), label_set)

    def _check_label_range(self, labels: np.ndarray, path: Path, label_set: str | None) -> None:
        k = self.num_classes if label_set is None else int(self.extra_labels[label_set]["num_classes"])
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        if len(bad):
            i = int(bad[0])
            raise CnmError(f"{path}: label {int(labels[i])} at index {i} is outside 0..{k - 1} "
                           f"({len(bad)} such labels); re-run `cnm prepare --force`")


def load_manifest(data_dir: str | os.PathLike, *, verify: bool = False) -> Manifest:
    """Read and check `DIR/manifest.json`; with `verify`, also every file's size and sha256.

    Every fault (missing directory, missing or unreadable manifest, unknown format version,
    missing keys) is a one-line CnmError that says how to fix it.
    """
    root = Path(data_dir)
    if not root.exists():
        raise CnmError(f"{root}: data directory does not exist; create it with "
                       f"`cnm prepare --dataset cifar100 --download --out {root}` "
                       f"(or --dataset synthetic for offline use)")
    if not root.is_dir():
        raise CnmError(f"{root}: not a directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise CnmError(f"{root}: no {MANIFEST}; this is not a `cnm prepare` output directory")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CnmError(f"{mpath}: unreadable manifest ({e.__class__.__name__}); "
                       f"re-run `cnm prepare --force`") from None
    if not isinstance(raw, dict):
        raise CnmError(f"{mpath}: manifest is not a JSON object; re-run `cnm prepare --force`")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CnmError(f"{mpath}: unknown format version {version!r} (this cnm reads "
                       f"{FORMAT_VERSION}); re-run `cnm prepare --force` with this cnm")
    try:
        man = Manifest(
            root=root,
            dataset=str(raw["dataset"]),
            num_classes=int(raw["num_classes"]),
            class_names=list(raw["class_names"]),
            counts={k: int(v) for k, v in raw["counts"].items()},
            mean=tuple(float(x) for x in raw["mean"]),
            std=tuple(float(x) for x in raw["std"]),
            files={k: {"sha256": str(v["sha256"]), "bytes": int(v["bytes"])} for k, v in raw["files"].items()},
            source=dict(raw.get("source", {})),
            extra_labels=dict(raw.get("extra_labels", {})),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CnmError(f"{mpath}: malformed manifest ({e.__class__.__name__}: {e}); "
                       f"re-run `cnm prepare --force`") from None
    if man.num_classes != len(man.class_names) or man.num_classes < 1:
        raise CnmError(f"{mpath}: num_classes {man.num_classes} does not match the {len(man.class_names)} "
                       f"class names; re-run `cnm prepare --force`")
    if len(man.mean) != 3 or len(man.std) != 3 or not all(math.isfinite(v) for v in man.mean + man.std) \
            or min(man.std) <= 0:
        raise CnmError(f"{mpath}: channel mean {list(man.mean)} / std {list(man.std)} must be 3 finite "
                       f"values with std > 0 (a constant channel cannot be normalised); "
                       f"re-run `cnm prepare --force`")
    if verify:
        man.verify()
    return man


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success rename it to `out`.

    On any exception (a full disk, Ctrl-C) the temporary directory is removed and `out` is left
    as it was. An existing `out` is replaced only with `force` (the old one is moved aside first
    and deleted after the rename, so there is never a moment without a complete output).
    Temporary names carry the host and process id (`.NAME.tmp-HOST-PID-XXXX`), so leftovers of
    a process that was killed outright (SIGKILL, power loss) are recognised and removed by the
    next run on the same host.
    """
    out = Path(os.path.abspath(out))  # "." or "x/" get a real name; symlinks are kept as given
    if out.exists() and not force:
        raise CnmError(f"{out}: already exists; pass --force to replace it")
    if force and out.exists() and not replaceable(out):
        raise CnmError(f"{out}: exists and is not a `cnm prepare` output (no {MANIFEST}); refusing to "
                       f"replace it even with --force: choose another output directory")
    parent = out.parent
    stamp = f"{host_tag()}-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{stamp}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output is an ordinary directory
    except OSError as e:
        raise CnmError(f"{out}: cannot create the output directory ({os_error_reason(e)})") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{stamp}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CnmError(f"{out}: write failed ({os_error_reason(e)}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_siblings(out: str | os.PathLike) -> list[str]:
    """Delete `.NAME.tmp-HOST-PID-*` / `.NAME.old-HOST-PID` siblings of `out` left by a process
    of this host that no longer runs; returns their names. Live processes' files are kept."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-{re.escape(host_tag())}-(\d+)(?:-|$)")
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def replaceable(out: str | os.PathLike) -> bool:
    """What --force may replace: an earlier prepared directory, or an empty directory."""
    out = Path(out)
    if out.is_dir():
        return (out / MANIFEST).is_file() or not any(out.iterdir())
    return False


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in pixel units of uint8 [N,H,W,3] images.

    Exact: a 256-bin histogram per channel (integer counts), then mean and variance from it.
    """
    hist = np.zeros((3, 256), np.int64)
    for i in range(0, len(images), chunk):
        block = np.asarray(images[i:i + chunk]).reshape(-1, 3)
        for c in range(3):
            hist[c] += np.bincount(block[:, c], minlength=256)
    hist = hist.astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    n = np.maximum(hist.sum(1), 1)
    mean = (hist * values).sum(1) / n
    var = (hist * (values - mean[:, None]) ** 2).sum(1) / n
    std = np.sqrt(var)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as a version-1.0 .npy file (the bytes `np.save` writes), flushed to disk.

    The data go through a Python `write`, not numpy's `write_array`: its `ndarray.tofile` turns a
    Ctrl-C or SIGTERM that lands inside it into a TypeError (a traceback instead of exit 130)."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a finished file to disk, so the final rename never exposes a truncated file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Pairs:
    """Indexable (image, label) view of two arrays, as ffcv's DatasetWriter wants."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, num_workers: int | None = None) -> None:
    """FFCV file with fields `image` (RGBImageField, raw) and `label` (IntField).

    images uint8 [N,32,32,3], labels int [N]. FFCV's own writer fans the samples out to worker
    processes and then polls a shared counter until every sample is done, so a worker that dies
    (a full disk) hangs it, and Ctrl-C leaves orphans and a shared-memory segment behind. Raw
    32x32 images are a memory copy each, so cnm runs ffcv's worker function in this process
    instead: the file is byte-for-byte what ffcv writes with one worker, every error propagates
    here, and nothing is left behind. `num_workers` is accepted for compatibility and ignored.
    """
    require("ffcv", "writing .beton files")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class InProcessWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()  # writes the header and field table; allocates a shared-memory table
            shm, size = self.metadata_sm, num_samples * self.metadata_type.itemsize
            self.metadata_sm = _Buffer(bytearray(size))  # a private table instead
            shm.close()
            shm.unlink()
            todo: queue.SimpleQueue = queue.SimpleQueue()
            for item in queue_content:
                todo.put(item)
            todo.put(None)
            allocations: queue.SimpleQueue = queue.SimpleQueue()
            done = multiprocessing.Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            work_fn(todo, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                    allocations, *extra_worker_args)
            self.finalize(allocations.get())

    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    # 2 MiB pages (ffcv's minimum; its default is 8 MiB): a small set's file stays small
    writer = InProcessWriter(str(path), fields, page_size=1 << 21, num_workers=1)
    writer.from_indexed_dataset(_Pairs(images, labels), chunksize=1000)


class _Buffer:
    """Stands in for a SharedMemory block: ffcv only touches `.buf`."""

    def __init__(self, buf: bytearray):
        self.buf = buf


def estimated_bytes(counts: Mapping[str, int], *, beton: bool, extra_label_sets: int = 0) -> int:
    """Upper estimate of a prepared directory's size: npy arrays, labels, betons (raw pixels,
    16 bytes of metadata per sample, page alignment) and the manifest."""
    total = 1 << 16
    for n in counts.values():
        total += n * (3072 + 8 * (1 + extra_label_sets)) + 512
        if beton:
            total += n * (3072 + 32) + (8 << 20)
    return total


def check_free_space(out: Path, needed: int) -> None:
    """One-line CnmError when the file system holding `out` has less than `needed` bytes free."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell; the write itself will report a full disk
    if free < needed:
        raise CnmError(f"{out}: not enough disk space: needs about {needed / 1e6:.0f} MB, "
                       f"{free / 1e6:.0f} MB free on that file system")


def write_dataset(
    out: str | os.PathLike,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    dataset: str,
    class_names: Sequence[str],
    extra_labels: Mapping[str, tuple[Sequence[str], Mapping[str, np.ndarray]]] | None = None,
    source: Mapping | None = None,
    force: bool = False,
    beton: bool | None = None,
    progress=None,
) -> Manifest:
    """Write a prepared directory atomically and return its manifest.

    splits: {"train": (images uint8 [N,32,32,3], labels int64-able [N]), "test": (...)}.
    extra_labels: {"coarse": (class_names, {"train": labels, "test": labels})}.
    beton: write FFCV files (None: when ffcv is importable).
    progress: optional callable(str) told about each step.
    """
    if beton is None:
        beton = available("ffcv")
    if "train" not in splits:
        raise CnmError("write_dataset: a train split is required")
    say = progress or (lambda msg: None)
    num_classes = len(class_names)
    out = Path(os.path.abspath(out))
    check_free_space(out, estimated_bytes({k: len(v[1]) for k, v in splits.items()}, beton=bool(beton),
                                          extra_label_sets=len(extra_labels or {})))
    with atomic_directory(out, force=force) as tmp:
        counts: dict[str, int] = {}
        for split, (images, labels) in splits.items():
            images = np.asarray(images)
            labels = np.asarray(labels).astype(np.int64, copy=False)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
                raise CnmError(f"{split}: images must be uint8 [N,32,32,3], got {images.dtype} {images.shape}")
            if labels.shape != (len(images),):
                raise CnmError(f"{split}: {len(labels)} labels for {len(images)} images")
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise CnmError(f"{split}: labels outside 0..{num_classes - 1}")
            counts[split] = len(images)
            say(f"writing {split} arrays ({len(images)} images)")
            _save_npy(tmp / images_file(split), images)
            _save_npy(tmp / labels_file(split), labels)
            if beton:
                say(f"writing {beton_file(split)}")
                write_beton(tmp / beton_file(split), images, labels)
                _fsync(tmp / beton_file(split))
        extra_meta = {}
        for name, (names, per_split) in (extra_labels or {}).items():
            extra_meta[name] = {"num_classes": len(names), "class_names": list(names)}
            for split, labels in per_split.items():
                labels = np.asarray(labels).astype(np.int64)
                if split not in counts or labels.shape != (counts[split],):
                    raise CnmError(f"{split}: {len(labels)} {name} labels for {counts.get(split, 0)} images")
                if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
                    raise CnmError(f"{split}: {name} labels outside 0..{len(names) - 1}")
                _save_npy(tmp / labels_file(split, name), labels)
        say("computing channel statistics and checksums")
        mean, std = channel_stats(splits["train"][0])
        if min(std) <= 0:
            raise CnmError(f"train: channel {std.index(min(std))} is constant (std 0), so it cannot be "
                           f"normalised; nothing was written")
        files = {}
        for p in sorted(tmp.iterdir()):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "num_classes": num_classes,
            "class_names": list(class_names),
            "counts": counts,
            "mean": mean,
            "std": std,
            "extra_labels": extra_meta,
            "formats": {"npy": True, "beton": bool(beton)},
            "files": files,
            "source": dict(source or {}),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(tmp / MANIFEST)
    return load_manifest(out)
