"""`pipeline.data.prepare`: round trips through ffcv's own Loader and the .npy files, the
manifest, atomicity (errors, Ctrl-C, a full disk), re-runs, --force, and missing ffcv."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import backends, fileio
from pipeline.data import manifest as manifest_mod
from pipeline.data.manifest import beton_file, images_file, labels_file, load_manifest
from pipeline.data.prepare import check_options, prepare
from pipeline.errors import CnmError
from tests import cifar_fakes as fakes


def read_beton(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All (images uint8 [N,32,32,3], labels int64 [N]) of a .beton, read by ffcv's own Loader
    in file order."""
    pytest.importorskip("ffcv")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = [], []
    for x, y in loader:
        images.append(np.array(x))
        labels.append(np.array(y).reshape(-1))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def leftovers(out: Path) -> list[str]:
    """Temporary or set-aside siblings of an output directory."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert leftovers(out) == []


@pytest.fixture
def hide_ffcv(monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)
    backends.reset_cache()
    yield
    monkeypatch.undo()
    backends.reset_cache()


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_round_trip_through_ffcv_and_npy(tmp_path, dataset):
    pytest.importorskip("ffcv")
    tar, arrays = fakes.make_release(tmp_path, dataset, 301, 67, seed=5)
    out = tmp_path / "out"
    warnings = []
    res = prepare(dataset, out, source=tar, lenient=True, warn=warnings.append)
    assert res.status == "written" and len(warnings) == 2
    man = load_manifest(out, verify=True)
    for split in ("train", "test"):
        images, labels = man.load_split(split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
        b_images, b_labels = read_beton(out / beton_file(split))
        assert b_images.dtype == np.uint8 and b_images.shape == arrays[split][0].shape
        np.testing.assert_array_equal(b_images, arrays[split][0])
        np.testing.assert_array_equal(b_labels, arrays[split][1])
        # npy format v1.0, exactly as documented
        with open(out / images_file(split), "rb") as f:
            assert f.read(8) == b"\x93NUMPY\x01\x00"
    assert man.dataset == dataset and man.counts == {"train": 301, "test": 67}
    if dataset == "cifar100":
        assert man.num_classes == 100 and man.class_names == fakes.fine_names()
        assert man.extra_labels["coarse"] == {"num_classes": 20, "class_names": fakes.coarse_names()}
        for split in ("train", "test"):
            _, coarse = man.load_split(split, label_set="coarse")
            np.testing.assert_array_equal(coarse, arrays["coarse"][split])
    else:
        assert man.num_classes == 10 and man.class_names == fakes.CIFAR10_CLASSES
    # statistics of the train split in pixel units, from a plain float64 computation
    flat = arrays["train"][0].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(man.mean, flat.mean(0), atol=1e-4)
    np.testing.assert_allclose(man.std, flat.std(0), atol=1e-4)
    # every output file is listed with its true sha256
    listed = set(man.files)
    assert listed == {p.name for p in out.iterdir()} - {"manifest.json"}
    for name, meta in man.files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"]
    src = man.source
    assert src["kind"] == "tarball" and src["name"] == tar.name and src["dataset"] == dataset
    assert src["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest() and src["lenient"] is True
    assert man.raw["formats"] == {"npy": True, "beton": True}
    assert leftovers(out) == []


def test_extracted_folder_as_source(tmp_path):
    pytest.importorskip("ffcv")
    folder, arrays = fakes.make_release(tmp_path, "cifar10", 120, 40, seed=2, tarball=False)
    out = tmp_path / "out"
    prepare("cifar10", out, source=folder, lenient=True)
    man = load_manifest(out, verify=True)
    for split in ("train", "test"):
        np.testing.assert_array_equal(man.load_split(split)[0], arrays[split][0])
        b_images, b_labels = read_beton(out / beton_file(split))
        np.testing.assert_array_equal(b_images, arrays[split][0])
        np.testing.assert_array_equal(b_labels, arrays[split][1])
    assert man.source["kind"] == "folder" and set(man.source["members"]) == {
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
        "batches.meta"}


def test_full_count_set_needs_no_lenient(tmp_path):
    """The official counts (50000/10000) pass without --lenient and without a warning. The
    .beton round trip is covered on the small sets above; here the .npy files and manifest."""
    folder, arrays = fakes.make_release(tmp_path, "cifar10", 50000, 10000, seed=1, tarball=False)
    out = tmp_path / "out"
    warnings = []
    res = prepare("cifar10", out, source=folder, beton=False, warn=warnings.append)
    assert warnings == [] and res.manifest.counts == {"train": 50000, "test": 10000}
    man = load_manifest(out)
    for split in ("train", "test"):
        images, labels = man.load_split(split, verify=False)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
    assert np.bincount(man.load_split("train", verify=False)[1]).tolist() == [5000] * 10
    assert not (out / beton_file("train")).exists() and man.raw["formats"]["beton"] is False


def test_in_process_beton_writer_matches_ffcv_writer(tmp_path):
    """cnm's in-process writer is ffcv's worker function run here: byte-identical to ffcv's own
    DatasetWriter with one worker process."""
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (700, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 700)
    manifest_mod.write_beton(tmp_path / "cnm.beton", images, labels)
    ref = DatasetWriter(str(tmp_path / "ffcv.beton"), {"image": RGBImageField(write_mode="raw"),
                                                       "label": IntField()}, page_size=1 << 21, num_workers=1)
    ref.from_indexed_dataset(manifest_mod._Pairs(images, labels), chunksize=1000)
    assert (tmp_path / "cnm.beton").read_bytes() == (tmp_path / "ffcv.beton").read_bytes()


def test_synthetic(tmp_path):
    out = tmp_path / "syn"
    res = prepare("synthetic", out, num_classes=4, train_size=40, test_size=12, seed=3, beton=False)
    man = res.manifest
    assert man.dataset == "synthetic" and man.num_classes == 4 and man.counts == {"train": 40, "test": 12}
    assert man.source == {"kind": "synthetic", "dataset": "synthetic", "generator": "cnm-synthetic-v1",
                          "num_classes": 4, "train_size": 40, "test_size": 12, "seed": 3}
    from pipeline.data.synthetic import make_synthetic

    ref = make_synthetic(4, 40, 12, 3)
    np.testing.assert_array_equal(man.load_split("train")[0], ref["train"][0])
    again = prepare("synthetic", out, num_classes=4, train_size=40, test_size=12, seed=3, beton=False)
    assert again.status == "up-to-date"
    with pytest.raises(CnmError, match="already exists.*--force"):
        prepare("synthetic", out, num_classes=4, train_size=40, test_size=12, seed=4, beton=False)


# ----------------------------------------------------------------------------- re-runs and --force


@pytest.fixture
def small_tar(tmp_path):
    return fakes.make_release(tmp_path, "cifar100", 30, 10, seed=4)


def test_rerun_on_up_to_date_output_only_verifies(tmp_path, small_tar, monkeypatch):
    tar, _ = small_tar
    out = tmp_path / "out"
    prepare("cifar100", out, source=tar, lenient=True, beton=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_write(*a, **k):
        raise AssertionError("an up-to-date output must not be rewritten")

    monkeypatch.setattr("pipeline.data.prepare.write_dataset", no_write)
    said = []
    res = prepare("cifar100", out, source=tar, lenient=True, say=said.append)
    assert res.status == "up-to-date" and any("verifying checksums" in s for s in said)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # the same content as an extracted folder is a different source: refused without --force
    with pytest.raises(CnmError, match="already exists, prepared from cifar100"):
        prepare("cifar100", out, source=tmp_path / "cifar100-src", lenient=True)


def test_rerun_detects_a_corrupted_output(tmp_path, small_tar):
    tar, _ = small_tar
    out = tmp_path / "out"
    prepare("cifar100", out, source=tar, lenient=True, beton=False)
    p = out / images_file("train")
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CnmError) as e:
        prepare("cifar100", out, source=tar, lenient=True)
    assert "train_images.npy" in str(e.value) and "sha256" in str(e.value) and "--force" in str(e.value)


def test_existing_output_is_left_alone_without_force(tmp_path, small_tar):
    tar, _ = small_tar
    out = tmp_path / "out"
    prepare("synthetic", out, num_classes=3, train_size=9, test_size=3, beton=False)
    before = (out / "manifest.json").read_text()
    with pytest.raises(CnmError) as e:
        prepare("cifar100", out, source=tar, lenient=True)
    assert "already exists" in str(e.value) and "--force" in str(e.value)
    assert (out / "manifest.json").read_text() == before
    res = prepare("cifar100", out, source=tar, lenient=True, force=True, beton=False)
    assert res.status == "written" and load_manifest(out, verify=True).dataset == "cifar100"
    assert leftovers(out) == []


def test_force_never_replaces_a_foreign_directory(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(CnmError, match="not a `cnm prepare` output"):
            prepare("synthetic", out, num_classes=3, train_size=9, test_size=3, beton=False, force=force)
    assert (out / "thesis.tex").read_text() == "precious" and leftovers(out) == []


def test_empty_existing_directory_is_filled(tmp_path):
    out = tmp_path / "made-by-hand"
    out.mkdir()
    prepare("synthetic", out, num_classes=3, train_size=9, test_size=3, beton=False)
    assert load_manifest(out, verify=True).counts == {"train": 9, "test": 3}


# ----------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-existing-with-force"])
def test_ctrl_c_leaves_nothing_partial(tmp_path, small_tar, monkeypatch, existing):
    tar, _ = small_tar
    out = tmp_path / "out"
    if existing:
        prepare("synthetic", out, num_classes=3, train_size=9, test_size=3, beton=False)
        before = (out / "manifest.json").read_text()
    real_save = manifest_mod._save_npy
    calls = []

    def interrupted(path, array):
        calls.append(path.name)
        if len(calls) == 3:  # train arrays written, then Ctrl-C
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(manifest_mod, "_save_npy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare("cifar100", out, source=tar, lenient=True, force=existing, beton=False)
    assert len(calls) == 3
    if existing:
        assert (out / "manifest.json").read_text() == before and leftovers(out) == []
    else:
        assert_nothing_written(out)


def test_full_disk_leaves_nothing_and_says_so(tmp_path, small_tar, monkeypatch):
    tar, _ = small_tar
    out = tmp_path / "out"
    real_save = manifest_mod._save_npy

    def disk_full(path, array):
        if path.name == images_file("test"):
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)

    monkeypatch.setattr(manifest_mod, "_save_npy", disk_full)
    with pytest.raises(CnmError) as e:
        prepare("cifar100", out, source=tar, lenient=True, beton=False)
    assert "no space left on device" in str(e.value) and "\n" not in str(e.value)
    assert_nothing_written(out)


def test_too_little_free_space_is_refused_up_front(tmp_path, small_tar, monkeypatch):
    tar, _ = small_tar
    out = tmp_path / "out"
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CnmError, match="not enough disk space"):
        prepare("cifar100", out, source=tar, lenient=True, beton=False)
    assert_nothing_written(out)


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    """A run killed outright (SIGKILL) leaves its temporary directory; the next run on the same
    host removes it, but never one of a process that is still running."""
    import subprocess

    host = fileio.host_tag()
    dead_pid = subprocess.Popen(["true"])  # its pid is free once it has been waited for
    dead_pid.wait()
    out = tmp_path / "syn"
    stale = tmp_path / f".syn.tmp-{host}-{dead_pid.pid}-abcd"
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"half")
    live = tmp_path / f".syn.tmp-{host}-{os.getppid()}-efgh"  # our parent is alive
    live.mkdir()
    other_host = tmp_path / f".syn.tmp-elsewhere-{dead_pid.pid}-ijkl"
    other_host.mkdir()
    prepare("synthetic", out, num_classes=3, train_size=9, test_size=3, beton=False)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert load_manifest(out, verify=True).counts["train"] == 9


def test_unwritable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CnmError, match="cannot create the output directory"):
        prepare("synthetic", blocker / "out", num_classes=3, train_size=9, test_size=3, beton=False)
    assert blocker.read_text() == "x"


def test_mkdir_permission_error_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(CnmError) as e:
        prepare("synthetic", tmp_path / "out", num_classes=3, train_size=9, test_size=3, beton=False)
    assert "permission denied" in str(e.value)
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- without ffcv


def test_without_ffcv_writes_npy_and_says_so(tmp_path, small_tar, hide_ffcv):
    tar, arrays = small_tar
    out = tmp_path / "out"
    warnings = []
    prepare("cifar100", out, source=tar, lenient=True, warn=warnings.append)
    assert any("ffcv is not installed" in w and "no .beton" in w for w in warnings)
    man = load_manifest(out, verify=True)
    assert man.raw["formats"] == {"npy": True, "beton": False}
    assert not man.has(beton_file("train")) and not (out / beton_file("train")).exists()
    np.testing.assert_array_equal(man.load_split("test")[0], arrays["test"][0])


def test_beton_demanded_without_ffcv_is_one_line(tmp_path, small_tar, hide_ffcv):
    tar, _ = small_tar
    with pytest.raises(CnmError, match=r"ffcv is not installed.*pip install 'cnm\[ffcv\]'"):
        prepare("cifar100", tmp_path / "out", source=tar, lenient=True, beton=True)
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("dataset,kw,words", [
    ("cifar10", {}, "needs --source PATH"),
    ("cifar10", {"source": "x", "download": True}, "not both"),
    ("cifar100", {"synthetic_params": {"seed": 1}}, "--seed only apply to --dataset synthetic"),
    ("synthetic", {"source": "x"}, "--source cannot be used with --dataset synthetic"),
    ("synthetic", {"download": True}, "--download cannot be used"),
    ("synthetic", {"lenient": True}, "--lenient cannot be used"),
    ("imagenet", {}, "unknown dataset"),
])
def test_impossible_option_combinations(dataset, kw, words):
    args = {"source": None, "download": False, "lenient": False, "synthetic_params": {}, **kw}
    with pytest.raises(CnmError) as e:
        check_options(dataset, **args)
    assert words in str(e.value)


def test_manifest_json_is_plain_json(tmp_path):
    out = tmp_path / "syn"
    prepare("synthetic", out, num_classes=3, train_size=9, test_size=3, beton=False)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == manifest_mod.FORMAT_VERSION
    assert set(raw) >= {"dataset", "num_classes", "class_names", "counts", "mean", "std", "files", "source",
                        "formats", "extra_labels"}
    assert raw["files"][labels_file("train")]["bytes"] == (out / labels_file("train")).stat().st_size


@pytest.mark.parametrize("array", [np.arange(7 * 32 * 32 * 3, dtype=np.uint8).reshape(7, 32, 32, 3),
                                   np.arange(5, dtype=np.int64), np.zeros((0, 32, 32, 3), np.uint8),
                                   np.arange(12, dtype=np.int16).reshape(3, 4).T])
def test_save_npy_writes_the_bytes_np_save_writes(tmp_path, array):
    """_save_npy writes its data with a Python write (so a signal inside it unwinds as itself), and
    the file is byte for byte what np.save writes of the C-ordered array (the manifest's checksums
    depend on it)."""
    manifest_mod._save_npy(tmp_path / "a.npy", array)
    np.save(tmp_path / "b.npy", np.ascontiguousarray(array))
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
