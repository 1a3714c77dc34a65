"""bench.op_speed (`cnm bench op`, `python -m bench.op_speed`): back-to-back timing with fake
clocks, the bytes moved (partner reads counted), % of the reference peak, and the real op on the
CPU with small batches (the same code as the CUDA sweep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import op_speed, stats
from bench.op_speed import OpSpeedConfig, run_op_bench, time_call
from cnm.cli import main
from pipeline.errors import CnmError
from pipeline.ops import draw_params, resolve_impl

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_many_launches_per_region_with_fake_clock():
    """B=100 per call, 1 ms per call, 1 MB per call: 1e5 images/s, 1000 us/call, 1 GB/s = half of
    a 2 GB/s peak; every region holds `launches` calls between two synchronisations."""
    clock, calls = FakeClock(), []

    def fn():
        calls.append(clock.t)
        clock.t += 1e-3

    cfg = OpSpeedConfig(device="cpu", launches=50, repeats=3, warmup=2)
    row = time_call(cfg, torch.device("cpu"), fn, b=100, bytes_per_call=10**6, peak=(2.0, "test"),
                    clock=clock)
    assert len(calls) == 2 + 3 * 50
    assert row["launches_per_repeat"] == 50 and row["seconds_per_repeat"] == pytest.approx([0.05] * 3)
    assert row["images_per_s"]["median"] == pytest.approx(1e5)
    assert row["us_per_call"]["median"] == pytest.approx(1000.0)
    assert row["bandwidth_gbps"]["median"] == pytest.approx(1.0)
    assert row["fraction_of_peak"] == pytest.approx(0.5) and row["peak_source"] == "test"


@pytest.mark.parametrize("mode", ["cutnmix", "cutmix", "mixup", "none"])
def test_partner_pixels_follow_the_parameters(mode):
    g = torch.Generator().manual_seed(3)
    p = draw_params(64, 3, 32, 32, mode=mode, generator=g)
    areas = (p.box_h * p.box_w).tolist()
    got = stats.partner_pixels(mode, areas, int(p.mixed.sum()), 3, 32, 32)
    expected = {"cutnmix": 3 * sum(areas), "cutmix": 3 * sum(areas),
                "mixup": 3 * int(p.mixed.sum()) * 1024, "none": 0}[mode]
    assert got == expected
    if mode != "none":
        assert got > 0  # 64 samples at mix_prob 0.5: some are mixed


def test_cpu_sweep_end_to_end():
    cfg = OpSpeedConfig(device="cpu", sweep=True, min_batch=16, max_batch=32, repeats=2, launches=2,
                        warmup=1, impls=("auto", "torch", "numpy"))
    doc = run_op_bench(cfg, copy_bytes=1 << 20)
    assert doc["bench"] == "op" and doc["config"]["batches"] == [16, 32]
    assert doc["peak"]["source"].startswith("measured cpu copy bandwidth") and doc["peak"]["gbps"] > 0
    rows = doc["results"]
    assert {r["batch"] for r in rows} == {16, 32}
    assert not any(r["timing"] == "cuda-graph" for r in rows)  # graphs are CUDA only
    auto = resolve_impl("auto", torch.device("cpu"))  # numba where installed, else torch
    impls = list(dict.fromkeys([auto, "torch"]))
    assert [(r["impl"], r["call"]) for r in rows if r["batch"] == 16] == [
        *((i, c) for i in impls for c in ("kernel", "draw+kernel")),
        ("numpy", "kernel")]  # the numpy reference has no draw of its own
    for r in rows:
        assert r["available"], r
        b = r["batch"]
        assert r["bytes_per_call"] > stats.op_bytes(b, 32, 32, 3, 4)  # + the partner reads
        assert r["images_per_repeat"] == [2 * b, 2 * b]
        assert r["bandwidth_gbps"]["median"] == pytest.approx(
            r["images_per_s"]["median"] * r["bytes_per_call"] / b / 1e9)
        assert r["fraction_of_peak"] == pytest.approx(r["bandwidth_gbps"]["median"] / doc["peak"]["gbps"])
        if r["impl"] == "torch":
            assert r["ratio_to_torch"] == pytest.approx(1.0)
    # the kernel and the draw+kernel rows of one B and implementation move the same bytes
    by = {(r["batch"], r["impl"], r["call"]): r for r in rows}
    assert by[(16, "torch", "kernel")]["bytes_per_call"] == by[(16, "torch", "draw+kernel")]["bytes_per_call"]
    json.dumps(doc, allow_nan=False)


def test_python_m_sweep_json_to_stdout():
    """What `cnm check` runs: `python -m bench.op_speed --sweep --json` prints only JSON on stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.op_speed", "--device", "cpu", "--sweep",
                           "--min-batch", "8", "--max-batch", "16", "--impls", "torch", "--launches", "2",
                           "--repeats", "1", "--warmup", "0", "--peak-gbps", "10", "--json"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["config"]["batches"] == [8, 16] and doc["peak"] == {"gbps": 10.0, "source": "--peak-gbps"}
    assert [(r["batch"], r["call"]) for r in doc["results"]] == [
        (8, "kernel"), (8, "draw+kernel"), (16, "kernel"), (16, "draw+kernel")]
    assert "us/call" in proc.stderr  # the table went to stderr


def test_cnm_bench_op_writes_json_file(tmp_path, capsys):
    out = tmp_path / "op.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", "op", "--device", "cpu", "--batch-size", "8", "--impls", "auto", "--launches", "2",
              "--repeats", "1", "--peak-gbps", "5", "--json", str(out)])
    assert e.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["batches"] == [8] and all(r["available"] for r in doc["results"])
    assert "us/call" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["--impls", "warp"], "unknown warp"),
    (["--sweep", "--min-batch", "64", "--max-batch", "8", "--device", "cpu"], "--min-batch 64"),
    (["--launches", "0"], "--launches must be >= 1"),
])
def test_bad_input_is_one_line(argv, msg, capsys):
    assert op_speed.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and len(err.splitlines()) == 1


def test_batches_of_the_sweep():
    cfg = OpSpeedConfig(sweep=True)
    assert cfg.batches(torch.device("cuda")) == [512 * 2**i for i in range(10)]  # 512 ... 262144
    assert cfg.batches(torch.device("cpu")) == [64, 128, 256, 512, 1024]
    assert OpSpeedConfig(batch_size=300).batches(torch.device("cuda")) == [300]
    with pytest.raises(CnmError):
        OpSpeedConfig(sweep=True, min_batch=9, max_batch=8).batches(torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_sweep_with_graphs():
    cfg = OpSpeedConfig(device="cuda", sweep=True, min_batch=512, max_batch=4096, repeats=2, launches=20)
    doc = run_op_bench(cfg)
    rows = [r for r in doc["results"] if r["available"]]
    assert {r["timing"] for r in rows} == {"back-to-back", "cuda-graph"}
    for r in rows:
        assert 0 < r["fraction_of_peak"] < 1.5
