"""Fake CIFAR-10/100 releases in the official python layout, of any size, for tests.

The official files (https://www.cs.toronto.edu/~kriz/cifar.html) were written by Python 2's
cPickle, protocol 2: every string is a py2 `str` (loaded as `bytes` with encoding="bytes"), and
the pixel array is a numpy array pickled through `numpy.core.multiarray._reconstruct`. Python 3's
pickler cannot produce that byte stream (it pickles `bytes` through `_codecs.encode` below
protocol 3), so `py2_pickle` emits the opcodes itself. Files written here load with the
recipe on the CIFAR page (`pickle.load(f, encoding="bytes")`) and with cnm's restricted reader.

Layouts written:
- CIFAR-10: `cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}`;
  batches hold b"batch_label", b"labels" (list of int), b"data" (uint8 [n, 3072]), b"filenames".
- CIFAR-100: `cifar-100-python/{train, test, meta, file.txt~}`; train/test hold b"filenames",
  b"batch_label", b"fine_labels", b"coarse_labels", b"data"; meta holds b"fine_label_names"
  and b"coarse_label_names".
Rows of b"data" are channel-major: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.

Typical use:
    arrays = cifar_arrays("cifar100", n_train=50, n_test=20, seed=1)
    folder = write_cifar_folder(tmp_path, "cifar100", arrays)
    tarball = write_tarball(folder, tmp_path / "cifar-100-python.tar.gz")
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- py2 pickles


def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle of `obj` as Python 2's cPickle wrote the CIFAR files.

    Supported: dict, list, tuple, bytes/str (both written as py2 `str`), bool, int, None, and
    C-contiguous numpy arrays of a plain dtype (written via numpy.core.multiarray._reconstruct).
    """
    out = io.BytesIO()
    out.write(b"\x80\x02")
    _emit(out, obj)
    out.write(b".")
    return out.getvalue()


def _emit_str(out: io.BytesIO, s: bytes) -> None:
    if len(s) < 256:
        out.write(b"U" + bytes([len(s)]) + s)  # SHORT_BINSTRING
    else:
        out.write(b"T" + struct.pack("<i", len(s)) + s)  # BINSTRING


def _emit_int(out: io.BytesIO, v: int) -> None:
    if 0 <= v < 256:
        out.write(b"K" + bytes([v]))  # BININT1
    elif -(2 ** 31) <= v < 2 ** 31:
        out.write(b"J" + struct.pack("<i", v))  # BININT
    else:
        raise ValueError("py2_pickle: int out of range")


def _emit_global(out: io.BytesIO, module: str, name: str) -> None:
    out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")  # GLOBAL


def _emit(out: io.BytesIO, obj) -> None:
    if obj is None:
        out.write(b"N")
    elif obj is True or obj is False:
        out.write(b"\x88" if obj else b"\x89")
    elif isinstance(obj, (int, np.integer)):
        _emit_int(out, int(obj))
    elif isinstance(obj, str):
        _emit_str(out, obj.encode("latin-1"))
    elif isinstance(obj, bytes):
        _emit_str(out, obj)
    elif isinstance(obj, dict):
        out.write(b"}(")  # EMPTY_DICT, MARK
        for k, v in obj.items():
            _emit(out, k)
            _emit(out, v)
        out.write(b"u")  # SETITEMS
    elif isinstance(obj, list):
        out.write(b"](")  # EMPTY_LIST, MARK
        for v in obj:
            _emit(out, v)
        out.write(b"e")  # APPENDS
    elif isinstance(obj, tuple):
        out.write(b"(")
        for v in obj:
            _emit(out, v)
        out.write(b"t")  # TUPLE
    elif isinstance(obj, np.ndarray):
        _emit_ndarray(out, obj)
    else:
        raise TypeError(f"py2_pickle: unsupported type {type(obj).__name__}")


def _emit_ndarray(out: io.BytesIO, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    # _reconstruct(ndarray, (0,), b'b')
    _emit_global(out, "numpy.core.multiarray", "_reconstruct")
    _emit_global(out, "numpy", "ndarray")
    out.write(b"K\x00\x85")  # (0,)  TUPLE1
    _emit_str(out, b"b")
    out.write(b"\x87R")  # TUPLE3, REDUCE
    # state: (1, shape, dtype, is_fortran, raw bytes)
    out.write(b"(K\x01")
    _emit(out, tuple(int(s) for s in a.shape))
    _emit_global(out, "numpy", "dtype")
    _emit_str(out, f"{a.dtype.kind}{a.dtype.itemsize}".encode())
    out.write(b"K\x00K\x01\x87R")  # dtype(str, 0, 1)
    order = b"|" if a.dtype.itemsize == 1 else b"<"
    out.write(b"(K\x03")
    _emit_str(out, order)
    out.write(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")  # dtype state, BUILD
    out.write(b"\x89")  # is_fortran False
    _emit_str(out, a.tobytes())
    out.write(b"tb")  # TUPLE, BUILD


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: str | Path) -> bytes:
    """A pickle that, when loaded by `pickle.load`, runs `touch MARKER` through os.system."""
    return pickle.dumps({"data": _RunsCode(str(marker))}, protocol=2)


# --------------------------------------------------------------------------- arrays


def cifar_arrays(dataset: str, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Random images and labels for a fake release.

    Returns {"train": (images uint8 [n,32,32,3], labels int64 [n]), "test": (...)}; for
    "cifar100" the labels are fine labels (0..99) and "coarse" holds
    {"train": int64 [n], "test": int64 [n]} with coarse = fine // 5 (0..19).
    Labels cycle through every class (a full-count set is exactly balanced) in a shuffled order.
    """
    rng = np.random.default_rng(seed)
    k = {"cifar10": 10, "cifar100": 100}[dataset]
    out: dict = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = np.frombuffer(rng.bytes(n * 3072), np.uint8).reshape(n, 32, 32, 3).copy()
        labels = rng.permutation(np.arange(n, dtype=np.int64) % k)
        out[split] = (images, labels)
    if dataset == "cifar100":
        out["coarse"] = {s: out[s][1] // 5 for s in ("train", "test")}
    return out


def to_rows(images: np.ndarray) -> np.ndarray:
    """uint8 [n,32,32,3] HWC -> the release's uint8 [n,3072] channel-major rows."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


# --------------------------------------------------------------------------- layouts

# A hook gets (file name, dict about to be pickled) and returns the dict to pickle, or raw
# bytes to write instead (to plant a malformed or malicious file).
Hook = Callable[[str, dict], "dict | bytes"]


def cifar_file_dicts(dataset: str, arrays: dict) -> dict[str, dict]:
    """{file name: dict} of the official layout (no directory prefix)."""
    files: dict[str, dict] = {}
    if dataset == "cifar10":
        images, labels = arrays["train"]
        parts = np.array_split(np.arange(len(labels)), 5)
        for b, idx in enumerate(parts, start=1):
            files[f"data_batch_{b}"] = {
                b"batch_label": f"training batch {b} of 5".encode(),
                b"labels": [int(v) for v in labels[idx]],
                b"data": to_rows(images[idx]),
                b"filenames": [f"img_{i}.png".encode() for i in idx],
            }
        images, labels = arrays["test"]
        files["test_batch"] = {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in labels],
            b"data": to_rows(images),
            b"filenames": [f"test_{i}.png".encode() for i in range(len(labels))],
        }
        files["batches.meta"] = {
            b"num_cases_per_batch": 10000,
            b"label_names": [n.encode() for n in CIFAR10_CLASSES],
            b"num_vis": 3072,
        }
    elif dataset == "cifar100":
        for split in ("train", "test"):
            images, labels = arrays[split]
            files[split] = {
                b"filenames": [f"{split}_{i}.png".encode() for i in range(len(labels))],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in labels],
                b"coarse_labels": [int(v) for v in arrays["coarse"][split]],
                b"data": to_rows(images),
            }
        files["meta"] = {
            b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
        }
    else:
        raise ValueError(dataset)
    return files


def fine_names() -> list[str]:
    return [f"fine_{i:02d}" for i in range(100)]


def coarse_names() -> list[str]:
    return [f"coarse_{i:02d}" for i in range(20)]


def write_cifar_folder(root: str | Path, dataset: str, arrays: dict, *, hook: Hook | None = None,
                       skip: tuple[str, ...] = ()) -> Path:
    """Write the extracted release folder under `root`; returns root/cifar-10-batches-py (or
    root/cifar-100-python). `skip` names files to leave out; `hook` may alter any file."""
    folder = Path(root) / (CIFAR10_DIR if dataset == "cifar10" else CIFAR100_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in cifar_file_dicts(dataset, arrays).items():
        if name in skip:
            continue
        if hook is not None:
            content = hook(name, content)
        (folder / name).write_bytes(content if isinstance(content, bytes) else py2_pickle(content))
    extra = "readme.html" if dataset == "cifar10" else "file.txt~"
    (folder / extra).write_text("fake CIFAR release written by tests/cifar_fakes.py\n")
    return folder


def write_tarball(folder: str | Path, tar_path: str | Path, *, compresslevel: int = 1) -> Path:
    """Pack `folder` (keeping its name as the top directory) into a tarball; gzip-compressed
    when the name ends in .gz (like the official cifar-*-python.tar.gz)."""
    folder, tar_path = Path(folder), Path(tar_path)
    gz = tar_path.name.endswith(".gz")
    kwargs = {"compresslevel": compresslevel} if gz else {}
    with tarfile.open(tar_path, "w:gz" if gz else "w", **kwargs) as tf:
        tf.add(folder, arcname=folder.name)
    return tar_path


def make_release(tmp: str | Path, dataset: str, n_train: int, n_test: int, *, seed: int = 0,
                 tarball: bool = True, hook: Hook | None = None, skip: tuple[str, ...] = ()):
    """One-call fake release: returns (path, arrays) where path is the .tar.gz (or the
    extracted folder with tarball=False) and arrays as from `cifar_arrays`."""
    tmp = Path(tmp)
    arrays = cifar_arrays(dataset, n_train, n_test, seed)
    folder = write_cifar_folder(tmp / f"{dataset}-src", dataset, arrays, hook=hook, skip=skip)
    if not tarball:
        return folder, arrays
    name = "cifar-10-python.tar.gz" if dataset == "cifar10" else "cifar-100-python.tar.gz"
    return write_tarball(folder, tmp / name), arrays


# --------------------------------------------------------------------------- a local web server


@contextlib.contextmanager
def http_server(routes: dict, *, lifetime_s: float = 120.0):
    """Serve `routes` on 127.0.0.1 from a daemon thread; yields (base_url, hits).

    routes: {"/path": body bytes (200) | int status (an error page) | ("cut", body, n) (announces
    len(body) bytes, sends the first n, then closes the connection)}. `hits` counts GETs per path.
    The server shuts itself down after `lifetime_s` even if the caller hangs.
    """
    hits: collections.Counter = collections.Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            route = routes.get(self.path, 404)
            if isinstance(route, int):
                self.send_error(route)
                return
            cut = None
            if isinstance(route, tuple):
                _, route, cut = route
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(route)))
            self.end_headers()
            self.wfile.write(route if cut is None else route[:cut])
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(lifetime_s, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    """A local TCP port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
