"""Data checks at load, before any step: label ranges, class count, channel statistics.

Each fault is injected with a *matching* manifest (checksums rewritten), so the sha256 check cannot
be what catches it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.data.manifest import MANIFEST, labels_file, load_manifest, write_dataset
from pipeline.errors import CnmError


@pytest.fixture
def prepared(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    out = tmp_path / "data"
    write_dataset(out, {"train": (imgs, np.arange(24) % 4), "test": (imgs[:8], np.arange(8) % 4)},
                  dataset="synthetic", class_names=[f"c{i}" for i in range(4)], beton=False)
    return out


def _edit_manifest(root, **changes):
    path = root / MANIFEST
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _replace_labels(root, split, labels):
    """Write new labels for `split` and make the manifest agree with them (size and sha256)."""
    name = labels_file(split)
    np.save(root / name, np.asarray(labels, dtype=np.int64))
    raw = json.loads((root / MANIFEST).read_text())
    data = (root / name).read_bytes()
    raw["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (root / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("bad", [4, -1, 1000])
def test_out_of_range_label_is_one_line_naming_the_file(prepared, split, bad):
    n = 24 if split == "train" else 8
    labels = np.arange(n) % 4
    labels[5] = bad
    _replace_labels(prepared, split, labels)
    man = load_manifest(prepared)
    for check in (lambda: man.check_labels(split), lambda: man.load_split(split)):
        with pytest.raises(CnmError) as e:
            check()
        msg = str(e.value)
        assert "\n" not in msg and labels_file(split) in msg
        assert f"label {bad} at index 5 is outside 0..3" in msg
    other = "test" if split == "train" else "train"
    man.check_labels(other)                                  # the untouched split passes


def test_good_labels_pass(prepared):
    man = load_manifest(prepared)
    man.check_labels("train")
    man.check_labels("test")
    with pytest.raises(CnmError, match="no split 'val'"):
        man.check_labels("val")


def test_class_count_must_match_the_names(prepared):
    _edit_manifest(prepared, num_classes=5)
    with pytest.raises(CnmError, match="num_classes 5 does not match the 4 class names"):
        load_manifest(prepared)


@pytest.mark.parametrize("std", [[60.0, 0.0, 60.0], [60.0, float("nan"), 60.0], [1.0, 2.0]])
def test_zero_or_non_finite_std_names_the_manifest(prepared, std):
    _edit_manifest(prepared, std=std)
    with pytest.raises(CnmError) as e:
        load_manifest(prepared)
    assert str(prepared / MANIFEST) in str(e.value) and "std > 0" in str(e.value)


def test_a_constant_channel_is_refused_before_anything_is_written(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    imgs[..., 1] = 7
    out = tmp_path / "flat"
    with pytest.raises(CnmError, match="channel 1 is constant"):
        write_dataset(out, {"train": (imgs, np.arange(8) % 2)}, dataset="synthetic",
                      class_names=["a", "b"], beton=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
