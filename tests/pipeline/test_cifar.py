"""The CIFAR reader: official layouts from tarball and folder, every verification, and the
restricted unpickler (a malicious pickle is refused before it can run anything)."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import cifar
from pipeline.errors import CnmError
from tests import cifar_fakes as fakes


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
def test_reads_official_layout_exactly(tmp_path, dataset, as_tarball):
    path, arrays = fakes.make_release(tmp_path, dataset, 53, 17, seed=3, tarball=as_tarball)
    warnings = []
    rel = cifar.read_cifar(dataset, path, lenient=True, warn=warnings.append)
    for split in ("train", "test"):
        images, labels = rel.splits[split]
        assert images.dtype == np.uint8 and images.shape == arrays[split][0].shape
        assert images.flags.c_contiguous
        np.testing.assert_array_equal(images, arrays[split][0])
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, arrays[split][1])
    assert len(warnings) == 2 and all("--lenient" in w for w in warnings)
    if dataset == "cifar10":
        assert rel.class_names == fakes.CIFAR10_CLASSES and rel.extra_labels == {}
    else:
        assert rel.class_names == fakes.fine_names()
        names, coarse = rel.extra_labels["coarse"]
        assert names == fakes.coarse_names()
        for split in ("train", "test"):
            np.testing.assert_array_equal(coarse[split], arrays["coarse"][split])
    assert rel.source["kind"] == ("tarball" if as_tarball else "folder")


def test_channel_order_is_release_rows_to_hwc(tmp_path):
    """A row of the release is 1024 R, 1024 G, 1024 B values, each 32x32 row-major."""
    path, arrays = fakes.make_release(tmp_path, "cifar10", 5, 5, tarball=False)
    rel = cifar.read_cifar("cifar10", path, lenient=True)
    row = fakes.cifar_file_dicts("cifar10", arrays)["data_batch_1"][b"data"][0]
    img = rel.splits["train"][0][0]
    assert img[0, 1, 0] == row[1] and img[1, 0, 0] == row[32]
    assert img[0, 0, 1] == row[1024] and img[0, 0, 2] == row[2048]


def test_folder_containing_the_release_folder(tmp_path):
    folder, arrays = fakes.make_release(tmp_path, "cifar100", 10, 10, tarball=False)
    rel = cifar.read_cifar("cifar100", folder.parent, lenient=True)  # .../cifar100-src
    np.testing.assert_array_equal(rel.splits["test"][0], arrays["test"][0])


def test_python3_pickles_with_str_keys_are_accepted(tmp_path):
    """A custom set written by Python 3 (protocol 4, str keys, numpy 2 globals) still loads."""
    arrays = fakes.cifar_arrays("cifar10", 10, 5, seed=1)

    def py3(name, d):
        return pickle.dumps({k.decode(): v for k, v in d.items()}, protocol=4)

    folder = fakes.write_cifar_folder(tmp_path, "cifar10", arrays, hook=py3)
    rel = cifar.read_cifar("cifar10", folder, lenient=True)
    np.testing.assert_array_equal(rel.splits["train"][0], arrays["train"][0])


def test_counts_must_be_official_without_lenient(tmp_path):
    path, _ = fakes.make_release(tmp_path, "cifar10", 50, 10)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", path)
    msg = _one_line(e)
    assert "data_batch_1..5" in msg and "50 train images" in msg and "--lenient" in msg


# ----------------------------------------------------------------------------- restricted unpickler


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = fakes.malicious_pickle(marker)
    with pytest.raises(CnmError) as e:
        cifar.load_pickle(__import__("io").BytesIO(payload), "evil")
    msg = _one_line(e)
    assert "refusing to unpickle" in msg and "system" in msg
    assert not marker.exists()
    # sanity: the payload really does run code under the plain unpickler
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
def test_malicious_release_file_is_refused(tmp_path, as_tarball):
    marker = tmp_path / "pwned"
    hook = (lambda name, d: fakes.malicious_pickle(marker) if name == "test_batch" else d)
    path, _ = fakes.make_release(tmp_path, "cifar10", 10, 5, hook=hook, tarball=as_tarball)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", path, lenient=True)
    msg = _one_line(e)
    assert "test_batch" in msg and "refusing" in msg
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("os", "system"), ("numpy", "load"),
                                          ("numpy.core.multiarray", "scalar"), ("copyreg", "_reconstructor"),
                                          ("_codecs", "encode"), ("numpy.lib.format", "read_array")])
def test_only_numpy_reconstruction_globals_are_allowed(module, name):
    """GLOBAL opcodes outside {_reconstruct, ndarray, dtype} are refused."""
    payload = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."
    with pytest.raises(CnmError) as e:
        cifar.load_pickle(__import__("io").BytesIO(payload), "f")
    assert f"{module}.{name}" in _one_line(e)


def test_allowed_globals_resolve_under_both_numpy_spellings():
    u = cifar.RestrictedUnpickler(__import__("io").BytesIO(b""))
    assert u.find_class("numpy.core.multiarray", "_reconstruct") is u.find_class("numpy._core.multiarray",
                                                                                 "_reconstruct")
    assert u.find_class("numpy", "ndarray") is np.ndarray and u.find_class("numpy", "dtype") is np.dtype
    a = np.arange(30, dtype=np.uint8).reshape(5, 6)
    back = cifar.load_pickle(__import__("io").BytesIO(fakes.py2_pickle({b"a": a})), "f")
    np.testing.assert_array_equal(back[b"a"], a)


# ----------------------------------------------------------------------------- faults


def _hooked(tmp_path, dataset, target, change, tarball=False):
    def hook(name, d):
        return change(dict(d)) if name == target else d

    path, _ = fakes.make_release(tmp_path, dataset, 20, 10, hook=hook, tarball=tarball)
    return path


def _set(key, value):
    def change(d):
        d[key] = value
        return d

    return change


def _drop(key):
    def change(d):
        del d[key]
        return d

    return change


FAULTS = [
    # (dataset, file, change, words the message must contain)
    ("cifar10", "data_batch_2", _set(b"data", np.zeros((4, 3000), np.uint8)),
     ["data_batch_2", "3072", "[4, 3000]"]),
    ("cifar10", "data_batch_2", _set(b"data", np.zeros((4, 3072), np.int64)),
     ["data_batch_2", "uint8", "int64"]),
    ("cifar10", "data_batch_2", _set(b"data", [1, 2, 3]), ["data_batch_2", "'data'", "list"]),
    ("cifar10", "test_batch", _set(b"labels", [10] * 10), ["test_batch", "'labels'", "10", "0..9"]),
    ("cifar10", "test_batch", _set(b"labels", [-1] * 10), ["test_batch", "-1", "0..9"]),
    ("cifar10", "test_batch", _set(b"labels", [1] * 9), ["test_batch", "9 entries", "10 images"]),
    ("cifar10", "test_batch", _set(b"labels", ["a"] * 10), ["test_batch", "integers"]),
    ("cifar10", "data_batch_1", _drop(b"labels"), ["data_batch_1", "missing key 'labels'"]),
    ("cifar10", "batches.meta", _set(b"label_names", [b"x"] * 9), ["batches.meta", "9 names", "10"]),
    ("cifar10", "test_batch", lambda d: [1, 2], ["test_batch", "expected a dict", "list"]),
    ("cifar100", "train", _set(b"fine_labels", [100] * 20), ["train", "'fine_labels'", "100", "0..99"]),
    ("cifar100", "test", _set(b"coarse_labels", [20] * 10), ["test", "'coarse_labels'", "0..19"]),
    ("cifar100", "train", _drop(b"coarse_labels"), ["train", "missing key 'coarse_labels'"]),
    ("cifar100", "meta", _drop(b"coarse_label_names"), ["meta", "coarse_label_names"]),
    ("cifar100", "test", lambda d: b"\x80\x02}(U\x04data", ["test", "ends early", "truncated"]),
    ("cifar100", "test", lambda d: b"this is not a pickle", ["test", "not a valid CIFAR pickle"]),
]


@pytest.mark.parametrize("dataset,target,change,words", FAULTS,
                         ids=[f"{d}-{t}-{i}" for i, (d, t, _, _) in enumerate(FAULTS)])
def test_each_fault_is_one_line_naming_file_and_fault(tmp_path, dataset, target, change, words):
    path = _hooked(tmp_path, dataset, target, change)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar(dataset, path, lenient=True)
    msg = _one_line(e)
    for w in words:
        assert w in msg, (w, msg)


def test_fault_inside_tarball_names_the_member(tmp_path):
    path = _hooked(tmp_path, "cifar10", "data_batch_3", _set(b"data", np.zeros((4, 3071), np.uint8)),
                   tarball=True)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", path, lenient=True)
    assert f"{path}:cifar-10-batches-py/data_batch_3" in _one_line(e)


@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
@pytest.mark.parametrize("given,actual", [("cifar100", "cifar10"), ("cifar10", "cifar100")])
def test_wrong_dataset_is_detected(tmp_path, given, actual, as_tarball):
    path, _ = fakes.make_release(tmp_path, actual, 10, 5, tarball=as_tarball)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar(given, path, lenient=True)
    msg = _one_line(e)
    assert f"--dataset {actual}" in msg and "release" in msg


def test_cifar10_files_renamed_into_cifar100_layout_are_detected(tmp_path):
    """CIFAR-10 batches under CIFAR-100 names: the missing fine labels give it away."""
    arrays10 = fakes.cifar_arrays("cifar10", 10, 5)
    d10 = fakes.cifar_file_dicts("cifar10", arrays10)
    arrays100 = fakes.cifar_arrays("cifar100", 10, 5)

    def hook(name, d):
        return {"train": d10["data_batch_1"], "test": d10["test_batch"]}.get(name, d)

    folder = fakes.write_cifar_folder(tmp_path, "cifar100", arrays100, hook=hook)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar100", folder, lenient=True)
    msg = _one_line(e)
    assert "fine_labels" in msg and "CIFAR-10" in msg and "--dataset cifar10" in msg


@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
def test_missing_file(tmp_path, as_tarball):
    path, _ = fakes.make_release(tmp_path, "cifar10", 10, 5, skip=("data_batch_4",), tarball=as_tarball)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", path, lenient=True)
    msg = _one_line(e)
    assert "incomplete CIFAR-10 release" in msg and "data_batch_4" in msg


def test_missing_path(tmp_path):
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", tmp_path / "nope.tar.gz")
    assert "no such file or directory" in _one_line(e)


def test_folder_without_cifar_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar100", tmp_path)
    assert "no CIFAR-100 files" in _one_line(e)


@pytest.mark.parametrize("content,words", [
    (b"", "not a tar archive"),
    (b"hello, this is text\n" * 40, "not a tar archive"),
    (fakes.py2_pickle({b"data": 1}), "not a tar archive"),
])
def test_not_a_tarball(tmp_path, content, words):
    p = tmp_path / "cifar-10-python.tar.gz"
    p.write_bytes(content)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", p)
    assert words in _one_line(e)


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.97])
def test_truncated_tarball(tmp_path, fraction):
    path, _ = fakes.make_release(tmp_path, "cifar100", 30, 10)
    data = path.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: max(10, int(len(data) * fraction))])
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar100", cut, lenient=True)
    msg = _one_line(e)
    assert str(cut) in msg and "truncated" in msg, msg


def test_archive_with_no_release_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    p = fakes.write_tarball(tmp_path / "d", tmp_path / "other.tar.gz")
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", p)
    assert "no CIFAR-10 files in this archive" in _one_line(e)


def test_member_that_is_not_a_regular_file(tmp_path):
    folder, _ = fakes.make_release(tmp_path, "cifar10", 10, 5, tarball=False)
    (folder / "batches.meta").unlink()
    (folder / "batches.meta").symlink_to("/etc/passwd")
    p = tmp_path / "c.tar"
    with tarfile.open(p, "w") as tf:
        tf.add(folder, arcname=folder.name)
    with pytest.raises(CnmError) as e:
        cifar.read_cifar("cifar10", p, lenient=True)
    assert "batches.meta: not a regular file" in _one_line(e)


def test_uncompressed_tar_is_accepted(tmp_path):
    folder, arrays = fakes.make_release(tmp_path, "cifar10", 10, 5, tarball=False)
    p = fakes.write_tarball(folder, tmp_path / "c.tar")
    rel = cifar.read_cifar("cifar10", p, lenient=True)
    np.testing.assert_array_equal(rel.splits["train"][1], arrays["train"][1])


# ----------------------------------------------------------------------------- identity


def test_source_identity(tmp_path):
    tar, _ = fakes.make_release(tmp_path / "a", "cifar10", 10, 5)
    ident = cifar.source_identity("cifar10", tar)
    assert ident["kind"] == "tarball" and ident["bytes"] == tar.stat().st_size
    assert ident["sha256"] == __import__("hashlib").sha256(tar.read_bytes()).hexdigest()
    assert cifar.same_source(ident, cifar.source_identity("cifar10", tar))
    folder = Path(tar).parent / "cifar10-src"
    f1 = cifar.source_identity("cifar10", folder)
    assert f1["kind"] == "folder" and set(f1["members"]) == set(cifar.LAYOUTS["cifar10"].files)
    assert not cifar.same_source(ident, f1)
    other, _ = fakes.make_release(tmp_path / "b", "cifar10", 10, 5, seed=9)
    assert not cifar.same_source(ident, cifar.source_identity("cifar10", other))
