"""bench.report: environment, --save file name, atomic JSON, tables, --plot without matplotlib."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from rich.console import Console

from bench import report
from pipeline import backends
from pipeline.environment import run_environment
from pipeline.errors import CnmError


def doc_with(results, bench="augment", **env) -> dict:
    base_env = {"date": "2025-11-25T03:04:05+00:00", "device": "cpu", "device_name": "Intel Xeon @ 2.2GHz",
                "cpu_count": 2, "git_commit": "0123456789abcdef", "git_dirty": False}
    base_env.update(env)
    cfg = {"peers": 3, "repeats": 2, "warmup": 1, "batch_size": 8, "mode": "cutnmix",
           "dtype_resolved": "float32", "data": "synthetic", "data_images": 32, "arch": "resnet20"}
    return {"schema": "cnm-bench/1", "bench": bench, "env": base_env, "config": cfg, "results": results}


ROWS = [
    {"pipeline": "cpu", "available": True, "images_per_s": {"min": 90.0, "median": 100.0, "max": 110.0},
     "ratio_to_cpu": 1.0, "peak_host_mb": 300.0, "peak_device_mb": None},
    {"pipeline": "op", "available": True, "images_per_s": {"min": 900.0, "median": 1000.0, "max": 1100.0},
     "ratio_to_cpu": 10.0, "peak_host_mb": 310.0, "peak_device_mb": None,
     "bandwidth_gbps": {"min": 1.0, "median": 1.2, "max": 1.3}, "fraction_of_peak": None, "peak_gbps": None},
    {"pipeline": "ffcv", "available": False, "reason": "ffcv is not installed: pip install 'cnm[ffcv]'",
     "images_per_s": None, "ratio_to_cpu": None, "peak_host_mb": None, "peak_device_mb": None},
]


def test_environment_has_documented_keys():
    env = run_environment(torch.device("cpu"))
    for key in ("date", "device", "device_name", "cpu_count", "torch", "ffcv", "dali", "triton",
                "git_commit", "python"):
        assert key in env
    assert env["device"] == "cpu"
    assert env["torch"] == torch.__version__
    # one report: everything `cnm info` describes is there too, the flat keys win
    assert {"packages", "loaders", "kernels", "usable_loaders", "cpu_model"} <= set(env)
    assert env["cuda"] == torch.version.cuda and env["device_name"] == (env["cpu_model"] or "cpu")
    assert env["cpu_count"] >= 1
    json.dumps(env)


def test_save_path_names(tmp_path):
    p = report.save_path(doc_with(ROWS), tmp_path)
    assert p == tmp_path / "2025-11-25-cpu-intel-xeon-2-2ghz-0123456789.json"
    p = report.save_path(doc_with(ROWS, git_dirty=True, device="cuda", device_name="NVIDIA H100 80GB HBM3"),
                         tmp_path)
    assert p.name == "2025-11-25-nvidia-h100-80gb-hbm3-0123456789-dirty.json"
    p = report.save_path(doc_with(ROWS, bench="train", git_commit=None), tmp_path)
    assert p.name == "2025-11-25-cpu-intel-xeon-2-2ghz-nocommit-train.json"


def test_save_writes_atomically(tmp_path):
    doc = doc_with(ROWS)
    path = report.save(doc, tmp_path / "results")
    assert json.loads(path.read_text()) == doc
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CnmError, match="out.json: could not write .*previous file is unchanged"):
        report.write_json(doc_with(ROWS), target)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_nan_is_refused():
    bad = doc_with([dict(ROWS[0], ratio_to_cpu=float("nan"))])
    with pytest.raises(ValueError):
        report.to_json(bad)


def test_tables_render():
    console = Console(width=200, record=True)
    console.print(report.table(doc_with(ROWS)))
    text = " ".join(console.export_text().split())
    assert "10.0x" in text and "1,000" in text and "unavailable" in text and "1.2 GB/s" in text
    assert "count as one image" in text
    assert "cnm[ffcv]" in text  # reasons are shown literally, not as rich markup


def test_train_table_renders():
    rows = [{"variant": "eager-fp32", "pipeline": "eager-fp32", "available": True,
             "images_per_s": {"min": 9.0, "median": 10.0, "max": 11.0},
             "ms_per_step": {"min": 700.0, "median": 800.0, "max": 900.0}, "ratio_to_eager": 1.0,
             "peak_host_mb": 500.0, "peak_device_mb": None, "settings_text": "NCHW fp32 eager loop"},
            {"variant": "+cuda-graphs", "pipeline": "+cuda-graphs", "available": False,
             "reason": "not applicable on cpu (needs CUDA)"}]
    console = Console(width=200, record=True)
    console.print(report.table(doc_with(rows, bench="train")))
    text = console.export_text()
    assert "800.0" in text and "n/a" in text and "needs CUDA" in text


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(backends, "_cache", {})
    with pytest.raises(CnmError, match=r"cnm\[plot\]"):
        report.plot(doc_with(ROWS), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot(doc_with(ROWS), tmp_path / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_op_table_renders():
    rows = [{"pipeline": "numba kernel", "available": True, "batch": 512, "impl": "numba", "call": "kernel",
             "timing": "back-to-back", "images_per_s": {"min": 9e5, "median": 1e6, "max": 1.1e6},
             "us_per_call": {"min": 465.5, "median": 512.0, "max": 568.9},
             "bandwidth_gbps": {"min": 19.0, "median": 21.5, "max": 23.0}, "fraction_of_peak": 0.4301,
             "ratio_to_torch": 6.25, "launches_per_repeat": 40, "peak_host_mb": 1.0, "peak_device_mb": None},
            {"pipeline": "numpy draw+kernel", "available": False, "batch": 512, "impl": "numpy",
             "call": "draw+kernel", "timing": "back-to-back", "reason": "no parameter draw of its own"}]
    doc = doc_with(rows, bench="op")
    doc["peak"] = {"gbps": 50.0, "source": "measured cpu copy bandwidth"}
    doc["config"]["dtype_resolved"] = "float32"
    console = Console(width=220, record=True)
    console.print(report.table(doc))
    text = " ".join(console.export_text().split())
    for cell in ("512.0", "1,000,000", "21.5", "43.0%", "6.2x", "40 calls/region",
                 "no parameter draw of its own", "50.0 GB/s (measured cpu copy bandwidth)"):
        assert cell in text, cell
