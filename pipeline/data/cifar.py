"""Read and verify the official CIFAR-10/100 python release (Krizhevsky, "Learning Multiple
Layers of Features from Tiny Images", 2009; https://www.cs.toronto.edu/~kriz/cifar.html).

Accepted sources: the `.tar.gz` as published (read member by member in one streaming pass,
nothing is extracted to disk), or its extracted folder (`cifar-10-batches-py` /
`cifar-100-python`, or a folder that contains it).

The release's files are Python-2 pickles. Unpickling can run arbitrary code, so they are loaded
with `RestrictedUnpickler`, which resolves exactly the three globals numpy's array pickles need
(`_reconstruct`, `ndarray`, `dtype`) and refuses every other one before anything is called; the
remaining content (dicts, lists, tuples, bytes, str, int) is plain pickle opcodes.

Every check turns a fault into one `CnmError` line that names the file and the fault: the file
set, each pickle's keys, 3072 bytes per image, labels in range, the official counts (50000
train / 10000 test; `lenient=True` accepts other counts with a warning, nothing else), and
CIFAR-10 given as CIFAR-100 or the other way round.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

from pipeline.errors import CnmError

DATASETS = ("cifar10", "cifar100")
OFFICIAL_COUNTS = {"train": 50000, "test": 10000}
BYTES_PER_IMAGE = 32 * 32 * 3


@dataclass(frozen=True)
class Layout:
    """What one release contains: its folder name, the files of each split, the meta file."""

    dataset: str
    folder: str
    tarball: str
    split_files: dict[str, tuple[str, ...]]
    meta_file: str
    label_key: str  # the training label in every split file
    extra_label_keys: dict[str, str]  # label-set name -> key (CIFAR-100: coarse)
    meta_names_key: str
    extra_meta_names_keys: dict[str, str]
    num_classes: int
    extra_num_classes: dict[str, int]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for fs in self.split_files.values() for f in fs) + (self.meta_file,)

    @property
    def pretty(self) -> str:
        return "CIFAR-10" if self.dataset == "cifar10" else "CIFAR-100"


LAYOUTS = {
    "cifar10": Layout(
        dataset="cifar10", folder="cifar-10-batches-py", tarball="cifar-10-python.tar.gz",
        split_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta_file="batches.meta", label_key="labels", extra_label_keys={},
        meta_names_key="label_names", extra_meta_names_keys={}, num_classes=10, extra_num_classes={},
    ),
    "cifar100": Layout(
        dataset="cifar100", folder="cifar-100-python", tarball="cifar-100-python.tar.gz",
        split_files={"train": ("train",), "test": ("test",)},
        meta_file="meta", label_key="fine_labels", extra_label_keys={"coarse": "coarse_labels"},
        meta_names_key="fine_label_names", extra_meta_names_keys={"coarse": "coarse_label_names"},
        num_classes=100, extra_num_classes={"coarse": 20},
    ),
}


def _other(dataset: str) -> str:
    return "cifar100" if dataset == "cifar10" else "cifar10"


# --------------------------------------------------------------------------- restricted pickle


# (module, name) -> the object; both spellings of numpy's core module are accepted because
# the release was pickled by numpy 1 ("numpy.core") and custom sets may come from numpy 2.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside what the CIFAR release needs."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for the CIFAR release: numpy array reconstruction plus plain containers.

    `find_class` is the only way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST, OBJ
    and the EXT opcodes all go through it), so refusing everything but numpy's `_reconstruct`,
    `ndarray` and `dtype` means a file cannot run code. `_reconstruct` only builds an empty
    array of the given ndarray subclass; only `numpy.ndarray` itself is reachable.
    Persistent ids are refused too (pickle's default).
    """

    def find_class(self, module: str, name: str):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise ForbiddenGlobal(module, name)
        return make()


def load_pickle(stream: IO[bytes], where: str, archive: str | None = None):
    """Unpickle one release file (encoding="bytes", as the release was written by Python 2).

    Raises a one-line CnmError naming `where` for a forbidden global or an unreadable pickle;
    `archive` is the tarball the stream comes from, named when the data ends early.
    """
    try:
        return RestrictedUnpickler(stream, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise CnmError(f"{where}: refusing to unpickle: it references {e.module}.{e.name}, which the "
                       f"CIFAR release never contains (a tampered or non-CIFAR file)") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        what = f"the archive is truncated or damaged; download {Path(archive).name} again" if archive \
            else "the file is truncated or damaged"
        raise CnmError(f"{where}: the data ends early ({_describe(e)}): {what}") from None
    except OSError as e:
        raise CnmError(f"{where}: cannot read ({_describe(e)})") from None
    except Exception as e:  # noqa: BLE001 - whatever else a malformed pickle raises (ValueError...)
        raise CnmError(f"{where}: not a valid CIFAR pickle ({_describe(e)})") from None


def _describe(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    return f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__


# --------------------------------------------------------------------------- reading


@dataclass
class CifarRelease:
    """A verified CIFAR release in cnm's layout.

    splits: {"train": (images uint8 [N,32,32,3] HWC RGB, labels int64 [N]), "test": (...)}
    extra_labels: {"coarse": (class_names, {"train": int64 [N], "test": int64 [N]})} (CIFAR-100)
    source: identity of what was read (see `source_identity`).
    """

    dataset: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    extra_labels: dict[str, tuple[list[str], dict[str, np.ndarray]]] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_cifar(dataset: str, path: str | Path, *, lenient: bool = False,
               warn: Callable[[str], None] | None = None, identity: dict | None = None) -> CifarRelease:
    """Read and verify the official release of `dataset` ("cifar10" | "cifar100") at `path`
    (the .tar.gz / .tar, the extracted folder, or a folder containing it).

    lenient: accept counts other than 50000/10000 (each deviation is a warning passed to `warn`
    and kept in `.warnings`). Every other fault is a one-line CnmError.
    identity: `source_identity(dataset, path)` when the caller has it already (saves a hash pass).
    """
    if dataset not in LAYOUTS:
        raise CnmError(f"unknown CIFAR dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    layout = LAYOUTS[dataset]
    path = Path(path)
    if not path.exists():
        raise CnmError(f"{path}: no such file or directory")
    if path.is_dir():
        folder = _find_folder(layout, path)
        raw = {name: _load_file(folder / name, f"{folder / name}") for name in layout.files}
        where = {name: str(folder / name) for name in layout.files}
    else:
        raw, where = _read_tarball(layout, path)
    release = _assemble(layout, raw, where, lenient=lenient, warn=warn)
    release.source = dict(identity) if identity is not None else source_identity(dataset, path)
    return release


def _find_folder(layout: Layout, path: Path) -> Path:
    other = LAYOUTS[_other(layout.dataset)]
    candidates = [path / layout.folder, path]
    for folder in candidates:
        if folder.is_dir() and any((folder / f).exists() for f in layout.files):
            missing = [f for f in layout.files if not (folder / f).is_file()]
            if missing:
                raise CnmError(f"{folder}: incomplete {layout.pretty} release: missing "
                               f"{', '.join(missing)}")
            return folder
    for folder in (path / other.folder, path):
        if folder.is_dir() and any((folder / f).exists() for f in other.files if f not in ("train", "test")):
            raise CnmError(f"{folder}: this is the {other.pretty} release ({other.folder}), not "
                           f"{layout.pretty}; use --dataset {other.dataset}")
    raise CnmError(f"{path}: no {layout.pretty} files here (expected {layout.folder}/ with "
                   f"{', '.join(layout.files)})")


def _load_file(path: Path, where: str):
    try:
        with open(path, "rb") as f:
            return load_pickle(io.BufferedReader(f, 1 << 20), where)
    except OSError as e:
        raise CnmError(f"{where}: cannot read ({_describe(e)})") from None


def _read_tarball(layout: Layout, path: Path) -> tuple[dict, dict]:
    """One streaming pass over the archive; only the release's files are unpickled."""
    other = LAYOUTS[_other(layout.dataset)]
    wanted = {f"{layout.folder}/{f}": f for f in layout.files}
    foreign = {f"{other.folder}/{f}" for f in other.files}
    raw: dict = {}
    where: dict = {}
    seen_any = False
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                name = member.name.removeprefix("./")
                seen_any = True
                if name in foreign or name.rstrip("/") == other.folder:
                    raise CnmError(f"{path}: this is the {other.pretty} release ({other.tarball}), "
                                   f"not {layout.pretty}; use --dataset {other.dataset}")
                if name not in wanted:
                    continue
                w = f"{path}:{name}"
                if not member.isfile():
                    raise CnmError(f"{w}: not a regular file in the archive")
                f = tf.extractfile(member)
                raw[wanted[name]] = load_pickle(f, w, archive=str(path))
                where[wanted[name]] = w
    except CnmError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if not seen_any and not _compressed(path):
            raise CnmError(f"{path}: not a tar archive ({_describe(e)}); expected the official "
                           f"{layout.tarball} or its extracted {layout.folder} folder") from None
        raise CnmError(f"{path}: the archive is truncated or damaged ({_describe(e)}); download it "
                       f"again") from None
    missing = [f for f in layout.files if f not in raw]
    if missing:
        if not raw:
            raise CnmError(f"{path}: no {layout.pretty} files in this archive (expected {layout.folder}/ "
                           f"with {', '.join(layout.files)})")
        raise CnmError(f"{path}: incomplete {layout.pretty} release: missing "
                       f"{', '.join(layout.folder + '/' + m for m in missing)}")
    return raw, where


def _compressed(path: Path) -> bool:
    """gzip, bzip2 or xz magic at the start of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


def _keys(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise CnmError(f"{where}: expected a dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            k = k.decode("latin-1")
        if not isinstance(k, str):
            raise CnmError(f"{where}: unexpected key {k!r}")
        out[k] = v
    return out


def _require(d: dict, key: str, where: str, hint: str = "") -> object:
    if key not in d:
        raise CnmError(f"{where}: missing key {key!r} (found {', '.join(map(repr, sorted(d)))}){hint}")
    return d[key]


def _names(value, n: int, key: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (bytes, str)) for v in value):
        raise CnmError(f"{where}: {key!r} must be a list of strings")
    if len(value) != n:
        raise CnmError(f"{where}: {key!r} has {len(value)} names, expected {n}")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]


def _labels(value, n_images: int, k: int, key: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        arr = np.asarray(value, dtype=np.int64) if value else np.zeros(0, np.int64)
    else:
        raise CnmError(f"{where}: {key!r} must be a list of integers")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CnmError(f"{where}: {key!r} must be a flat list of integers, found {arr.dtype} {arr.shape}")
    if len(arr) != n_images:
        raise CnmError(f"{where}: {len(arr)} entries in {key!r} for {n_images} images")
    if len(arr) and (arr.min() < 0 or arr.max() >= k):
        bad = int(arr[(arr < 0) | (arr >= k)][0])
        raise CnmError(f"{where}: {key!r} holds {bad}, outside 0..{k - 1}")
    return arr.astype(np.int64, copy=False)


def _images(value, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise CnmError(f"{where}: 'data' must be a uint8 array [N, 3072], found {type(value).__name__}")
    if value.dtype != np.uint8 or value.ndim != 2 or value.shape[1] != BYTES_PER_IMAGE:
        raise CnmError(f"{where}: 'data' must be uint8 [N, 3072] (32x32x3 bytes per image), "
                       f"found {value.dtype} {list(value.shape)}")
    # rows are channel-major (1024 R, 1024 G, 1024 B); cnm stores HWC
    return value.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _assemble(layout: Layout, raw: dict, where: dict, *, lenient: bool,
              warn: Callable[[str], None] | None) -> CifarRelease:
    other = LAYOUTS[_other(layout.dataset)]
    warnings: list[str] = []
    meta = _keys(raw[layout.meta_file], where[layout.meta_file])
    if layout.meta_names_key not in meta and other.meta_names_key in meta:
        raise CnmError(f"{where[layout.meta_file]}: holds {other.pretty} class names "
                       f"({other.meta_names_key!r}); use --dataset {other.dataset}")
    class_names = _names(_require(meta, layout.meta_names_key, where[layout.meta_file]),
                         layout.num_classes, layout.meta_names_key, where[layout.meta_file])
    extra_names = {
        name: _names(_require(meta, key, where[layout.meta_file]), layout.extra_num_classes[name],
                     key, where[layout.meta_file])
        for name, key in layout.extra_meta_names_keys.items()
    }
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    extra: dict[str, dict[str, np.ndarray]] = {name: {} for name in layout.extra_label_keys}
    for split, files in layout.split_files.items():
        parts, labels, extras = [], [], {name: [] for name in layout.extra_label_keys}
        for fname in files:
            w = where[fname]
            d = _keys(raw[fname], w)
            hint = ""
            if layout.label_key not in d and other.label_key in d:
                hint = f"; this looks like a {other.pretty} file: use --dataset {other.dataset}"
            images = _images(_require(d, "data", w), w)
            y = _labels(_require(d, layout.label_key, w, hint), len(images), layout.num_classes,
                        layout.label_key, w)
            for name, key in layout.extra_label_keys.items():
                extras[name].append(_labels(_require(d, key, w), len(images),
                                            layout.extra_num_classes[name], key, w))
            parts.append(images)
            labels.append(y)
        n = sum(len(p) for p in parts)
        w = where[files[0]] if len(files) == 1 else f"{where[files[0]]}..{files[-1].rsplit('_', 1)[-1]}"
        if n == 0:
            raise CnmError(f"{w}: the {split} split has no images")
        if n != OFFICIAL_COUNTS[split]:
            msg = f"{w}: {n} {split} images, the official release has {OFFICIAL_COUNTS[split]}"
            if not lenient:
                raise CnmError(msg + " (pass --lenient to accept a custom set in the CIFAR layout)")
            warnings.append(msg + " (accepted: --lenient)")
        images = np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])
        splits[split] = (images, np.concatenate(labels))
        for name in layout.extra_label_keys:
            extra[name][split] = np.concatenate(extras[name])
    for msg in warnings:  # only once everything else has passed: an error stays the only line
        if warn:
            warn(msg)
    return CifarRelease(
        dataset=layout.dataset,
        splits=splits,
        class_names=class_names,
        extra_labels={name: (extra_names[name], extra[name]) for name in layout.extra_label_keys},
        warnings=warnings,
    )


# --------------------------------------------------------------------------- identity


def hash_file(path: Path, *algorithms: str, chunk: int = 1 << 22) -> dict[str, str]:
    """{algorithm: hexdigest} of a file in one pass."""
    hs = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hs.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hs.items()}


def source_identity(dataset: str, path: str | Path) -> dict:
    """What a prepared directory records about its source, and what decides "up to date".

    A tarball: {"kind": "tarball", "dataset", "name", "path", "bytes", "sha256", "md5"}.
    A folder:  {"kind": "folder", "dataset", "name", "path", "members": {file: sha256}} over the
    release's files (their content identifies the source wherever the folder lives).
    """
    layout = LAYOUTS[dataset]
    path = Path(path)
    if not path.exists():
        raise CnmError(f"{path}: no such file or directory")
    try:
        if path.is_dir():
            folder = _find_folder(layout, path)
            members = {f: hash_file(folder / f, "sha256")["sha256"] for f in layout.files}
            return {"kind": "folder", "dataset": dataset, "name": folder.name,
                    "path": str(folder.resolve()), "members": members}
        digests = hash_file(path, "sha256", "md5")
        return {"kind": "tarball", "dataset": dataset, "name": path.name, "path": str(path.resolve()),
                "bytes": path.stat().st_size, **digests}
    except OSError as e:
        raise CnmError(f"{path}: cannot read ({_describe(e)})") from None


def same_source(recorded: dict, current: dict) -> bool:
    """True when two source identities denote the same content."""
    if not recorded or recorded.get("dataset") != current.get("dataset"):
        return False
    if recorded.get("kind") != current.get("kind"):
        return False
    if current.get("kind") == "tarball":
        return recorded.get("sha256") == current.get("sha256")
    if current.get("kind") == "folder":
        return recorded.get("members") == current.get("members")
    keys = set(recorded) | set(current)
    return all(recorded.get(k) == current.get(k) for k in keys if k not in ("path",))
