"""Every bad input to make_loader is a one-line CnmError that says what to do."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from pipeline import backends
from pipeline.errors import CnmError
from pipeline.loaders import make_loader
from tests.pipeline.loaders.conftest import indexed_split

ALL = ["resident", "cpu", "dali", "ffcv"]
BACKEND = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def raises_one_line(match: str, name: str, data, *, need_backend: bool = True, **kw) -> str:
    if name in BACKEND and need_backend:
        pytest.importorskip(BACKEND[name])
    with pytest.raises(CnmError, match=match) as e:
        make_loader(name, data, batch_size=4, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def copy_of(prepared, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(prepared, dst)
        return dst
    return make


@pytest.mark.parametrize("name", ["auto", *ALL])
def test_missing_directory(name, tmp_path):
    raises_one_line("does not exist.*cnm prepare", name, tmp_path / "nowhere")


@pytest.mark.parametrize("name", ALL)
def test_missing_file(name, copy_of):
    data = copy_of()
    victim = "train.beton" if name == "ffcv" else "train_images.npy"
    (data / victim).unlink()
    msg = raises_one_line("missing", name, data)
    assert victim in msg


@pytest.mark.parametrize("name", ALL)
def test_corrupt_file_fails_the_checksum(name, copy_of):
    data = copy_of()
    victim = data / ("train.beton" if name == "ffcv" else "train_images.npy")
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(raw))
    raises_one_line("sha256 does not match", name, data)


def test_corrupt_labels_file_is_caught_too(copy_of):
    data = copy_of()
    victim = data / "test_labels.npy"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01
    victim.write_bytes(bytes(raw))
    raises_one_line("test_labels.npy: sha256", "cpu", data, split="test")
    make_loader("resident", data, split="train")  # only the files a loader reads are verified


@pytest.mark.parametrize("name", ["auto", *ALL])
def test_unknown_manifest_format_version(name, copy_of):
    data = copy_of()
    m = json.loads((data / "manifest.json").read_text())
    m["format_version"] = 99
    (data / "manifest.json").write_text(json.dumps(m))
    raises_one_line("unknown format version 99", name, data)


def test_unknown_loader_name_lists_the_choices(prepared):
    msg = raises_one_line("unknown loader 'tfds'", "tfds", prepared)
    for choice in ("auto", "ffcv", "dali", "resident", "cpu"):
        assert choice in msg


@pytest.mark.parametrize("name,module,extra", [("ffcv", "ffcv", "cnm[ffcv]"), ("dali", "nvidia.dali", "cnm[dali]")])
def test_backend_not_installed_names_the_extra(name, module, extra, prepared, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    backends.reset_cache()
    try:
        msg = raises_one_line(f"{module} is not installed", name, prepared, need_backend=False)
        assert f"pip install '{extra}'" in msg
    finally:
        monkeypatch.undo()
        backends.reset_cache()


def test_ffcv_without_betons_says_to_install_the_extra_and_reprepare(tmp_path):
    pytest.importorskip("ffcv")
    from pipeline.data.manifest import write_dataset

    data = write_dataset(tmp_path / "nobeton", {"train": indexed_split(8, 0), "test": indexed_split(4, 0)},
                         dataset="x", class_names=[str(i) for i in range(10)], beton=False).root
    msg = raises_one_line("no train.beton", "ffcv", data)
    assert "cnm[ffcv]" in msg and "cnm prepare" in msg


def test_other_bad_arguments(prepared):
    raises_one_line("no split 'val'", "resident", prepared, split="val")
    raises_one_line("rank must be in 0..1", "resident", prepared, rank=2, world=2)
    raises_one_line("unexpected keyword", "resident", prepared, num_workers=3)
    raises_one_line("unknown ffcv order", "ffcv", prepared, order="zigzag")
    raises_one_line("native_augment=True needs an augment op", "dali", prepared, native_augment=True)
    if not torch.cuda.is_available():
        raises_one_line("CUDA is not available", "resident", prepared, device="cuda")
    with pytest.raises(CnmError, match="non-negative"):
        make_loader("resident", prepared).set_epoch(-1)
