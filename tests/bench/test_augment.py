"""`cnm bench` (bench.augment): ratios and bandwidth from injected fake timings, unavailable
back-ends, and the real pipelines end to end on the CPU with tiny settings."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import report
from bench.augment import AugmentConfig, run_augment_bench
from bench.harness import Workload
from bench.isolated import run_isolated
from bench.peaks import lookup
from pipeline import backends
from pipeline.errors import CnmError


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fake_builder(clock: FakeClock, seconds_per_batch: float, batch: int, bytes_per_image=None):
    def build(ctx):
        def step():
            clock.t += seconds_per_batch
            return batch

        return Workload(step=step, bytes_per_image=bytes_per_image)

    return build


def tiny(**kw) -> AugmentConfig:
    base = dict(data="synthetic", device="cpu", peers=2, batch_size=8, repeats=2, batches=2,
                warmup=1, synthetic_images=32)
    base.update(kw)
    return AugmentConfig(**base)


@pytest.fixture
def hide_backends(monkeypatch):
    """Make ffcv and nvidia.dali unimportable for the test (and forget cached imports)."""
    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
        backends.reset_cache()
    yield hide
    monkeypatch.undo()
    backends.reset_cache()


def test_ratios_from_fake_timings():
    clock = FakeClock()
    builders = {
        "cpu": fake_builder(clock, 0.1, 8),        # 80 images/s
        "resident": fake_builder(clock, 0.01, 8),  # 800 images/s
        "op": fake_builder(clock, 0.002, 8),       # 4000 images/s
    }
    doc = run_augment_bench(tiny(pipelines=("cpu", "resident", "op")), builders=builders, clock=clock)
    rows = {r["pipeline"]: r for r in doc["results"]}
    assert rows["cpu"]["images_per_s"] == pytest.approx({"min": 80, "median": 80, "max": 80})
    assert rows["cpu"]["ratio_to_cpu"] == pytest.approx(1.0)
    assert rows["resident"]["ratio_to_cpu"] == pytest.approx(10.0)
    assert rows["op"]["ratio_to_cpu"] == pytest.approx(50.0)
    assert rows["op"]["seconds_per_repeat"] == pytest.approx([0.004, 0.004])
    assert rows["op"]["images_per_repeat"] == [16, 16]
    assert [r["pipeline"] for r in doc["results"]] == ["cpu", "resident", "op"]


def test_medians_over_uneven_repeats():
    clock = FakeClock()
    per_batch = iter([0.5,            # warm-up
                      0.1, 0.1,       # repeat 1: 16 images in 0.2 s -> 80/s
                      0.4, 0.4,       # repeat 2: 16 in 0.8 s -> 20/s
                      0.05, 0.05])    # repeat 3: 16 in 0.1 s -> 160/s

    def build(ctx):
        def step():
            clock.t += next(per_batch)
            return 8
        return Workload(step=step)

    doc = run_augment_bench(tiny(pipelines=("cpu",), repeats=3), builders={"cpu": build}, clock=clock)
    ips = doc["results"][0]["images_per_s"]
    assert ips == pytest.approx({"min": 20.0, "median": 80.0, "max": 160.0})
    assert doc["results"][0]["warmup_seconds"] == pytest.approx(0.5)


def test_no_cpu_baseline_means_no_ratio():
    clock = FakeClock()
    doc = run_augment_bench(tiny(pipelines=("resident",)),
                            builders={"resident": fake_builder(clock, 0.01, 8)}, clock=clock)
    assert doc["results"][0]["available"] is True
    assert doc["results"][0]["ratio_to_cpu"] is None


def test_op_bandwidth_against_peak():
    clock = FakeClock()
    # 8 images of 1e6 bytes each in 1 ms -> 8e9 B/s = 8 GB/s; against a 16 GB/s peak: 0.5
    builders = {"op": fake_builder(clock, 0.001, 8, bytes_per_image=1e6)}
    doc = run_augment_bench(tiny(pipelines=("op",), peak_gbps=16.0), builders=builders, clock=clock)
    row = doc["results"][0]
    assert row["bandwidth_gbps"]["median"] == pytest.approx(8.0)
    assert row["fraction_of_peak"] == pytest.approx(0.5)
    assert row["peak_gbps"] == 16.0
    # without a known peak (a CPU) the fraction is None, the bandwidth is still there
    doc = run_augment_bench(tiny(pipelines=("op",)), builders=builders, clock=clock)
    row = doc["results"][0]
    assert row["fraction_of_peak"] is None and row["peak_gbps"] is None
    assert row["bandwidth_gbps"]["median"] == pytest.approx(8.0)


def test_real_op_bytes_per_image():
    """The real op workload declares B*H*W*3 + P*3*H*W*itemsize bytes per image."""
    doc = run_augment_bench(tiny(pipelines=("op",), dtype="fp32", peers=3))
    row = doc["results"][0]
    assert row["available"], row.get("reason")
    assert row["bytes_per_image"] == 32 * 32 * 3 + 3 * 3 * 32 * 32 * 4
    assert row["bandwidth_gbps"]["median"] == pytest.approx(
        row["images_per_s"]["median"] * row["bytes_per_image"] / 1e9)
    # its own batch size (larger than the split: the split is repeated)
    doc = run_augment_bench(tiny(pipelines=("op",), op_batch_size=40, batches=None, images=100))
    row = doc["results"][0]
    assert row["batches_per_repeat"] == 3 and row["images_per_repeat"] == [120, 120]
    assert row["notes"]["bytes_per_batch"] == 40 * (3072 + 2 * 3072 * 4)


def test_missing_backends_reported_unavailable(hide_backends):
    hide_backends("ffcv", "nvidia.dali")
    clock = FakeClock()
    doc = run_augment_bench(tiny(pipelines=("cpu", "ffcv", "dali", "dali-native")),
                            builders={"cpu": fake_builder(clock, 0.1, 8)}
                            | {k: _must_not_build for k in ("ffcv", "dali", "dali-native")},
                            clock=clock)
    rows = {r["pipeline"]: r for r in doc["results"]}
    assert rows["cpu"]["available"] is True
    for name, extra in (("ffcv", "ffcv"), ("dali", "dali"), ("dali-native", "dali")):
        assert rows[name]["available"] is False
        assert f"cnm[{extra}]" in rows[name]["reason"]
        assert rows[name]["images_per_s"] is None and rows[name]["ratio_to_cpu"] is None
    json.dumps(doc, allow_nan=False)  # still a valid document


def _must_not_build(ctx):
    raise AssertionError("a pipeline with a missing back-end must not be built")


def test_builder_errors_become_unavailable():
    def refuses(ctx):
        raise CnmError("DALI needs a CUDA device")

    def crashes(ctx):
        raise RuntimeError("driver exploded\nsecond line")

    clock = FakeClock()
    doc = run_augment_bench(tiny(pipelines=("cpu", "resident", "op")), clock=clock,
                            builders={"cpu": fake_builder(clock, 0.1, 8), "resident": refuses,
                                      "op": crashes})
    rows = {r["pipeline"]: r for r in doc["results"]}
    assert not rows["resident"]["available"]
    assert rows["resident"]["reason"] == "DALI needs a CUDA device"
    assert not rows["op"]["available"]
    assert rows["op"]["reason"] == "failed to start: RuntimeError: driver exploded"


def test_failure_while_running_keeps_other_rows():
    clock = FakeClock()

    def dies(ctx):
        def step():
            raise RuntimeError("worker died")
        return Workload(step=step)

    doc = run_augment_bench(tiny(pipelines=("cpu", "resident")), clock=clock,
                            builders={"cpu": fake_builder(clock, 0.1, 8), "resident": dies})
    rows = {r["pipeline"]: r for r in doc["results"]}
    assert rows["cpu"]["available"]
    assert rows["resident"]["failed"] is True and "worker died" in rows["resident"]["reason"]


@pytest.mark.parametrize("kw, msg", [
    (dict(pipelines=("cpu", "gpu9")), "unknown pipeline"),
    (dict(batches=2, images=16), "not both"),
    (dict(batch_size=0), "--batch-size"),
    (dict(synthetic_images=4), "--synthetic-images"),
    (dict(mode="blend"), "--mode"),
    (dict(device="tpu"), "--device"),
])
def test_bad_settings_are_one_line_errors(kw, msg):
    with pytest.raises(CnmError, match=msg):
        run_augment_bench(tiny(**kw))


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(CnmError, match="does not exist"):
        run_augment_bench(tiny(data=str(tmp_path / "nope"), pipelines=("op",)))


def test_images_per_repeat_rounds_up_to_batches():
    clock = FakeClock()
    doc = run_augment_bench(tiny(pipelines=("cpu",), batches=None, images=20),
                            builders={"cpu": fake_builder(clock, 0.1, 8)}, clock=clock)
    assert doc["results"][0]["batches_per_repeat"] == 3
    assert doc["results"][0]["images_per_repeat"] == [24, 24]


SCHEMA_ROW_KEYS = {"pipeline", "available", "images_per_s", "ratio_to_cpu", "peak_host_mb", "peak_device_mb"}
ENV_KEYS = {"date", "device", "device_name", "cpu_count", "torch", "ffcv", "dali", "triton", "git_commit"}


def check_schema(doc: dict) -> None:
    assert doc["schema"] == "cnm-bench/1"
    assert ENV_KEYS <= set(doc["env"])
    assert isinstance(doc["env"]["cpu_count"], int) and doc["env"]["cpu_count"] >= 1
    assert doc["results"]
    for row in doc["results"]:
        assert SCHEMA_ROW_KEYS <= set(row), row
        assert isinstance(row["pipeline"], str) and isinstance(row["available"], bool)
        if row["available"]:
            ips = row["images_per_s"]
            assert set(ips) == {"min", "median", "max"}
            assert 0 < ips["min"] <= ips["median"] <= ips["max"]
            assert row["peak_host_mb"] > 0
        else:
            assert row["reason"]
    json.loads(report.to_json(doc))


def test_real_pipelines_end_to_end_cpu(tmp_path):
    """cpu baseline, resident and the op for real, tiny settings; the documented schema."""
    cfg = tiny(pipelines=("cpu", "resident", "op"), synthetic_images=48, batch_size=16, peers=3)
    doc = run_augment_bench(cfg)
    check_schema(doc)
    rows = {r["pipeline"]: r for r in doc["results"]}
    for name in ("cpu", "resident", "op"):
        assert rows[name]["available"], rows[name].get("reason")
        assert rows[name]["images_per_repeat"] == [32, 32]
    assert rows["cpu"]["ratio_to_cpu"] == pytest.approx(1.0)
    assert rows["resident"]["ratio_to_cpu"] == pytest.approx(
        rows["resident"]["images_per_s"]["median"] / rows["cpu"]["images_per_s"]["median"])
    assert doc["env"]["device"] == "cpu"
    assert doc["config"]["dtype_resolved"] == "float32"
    assert rows["cpu"]["peak_device_mb"] is None  # no device memory on a CPU run
    assert torch.get_num_threads() >= 1


@pytest.mark.gpu
def test_real_pipelines_end_to_end_cuda():
    """On a GPU box (where ffcv/DALI may be missing: those rows are then unavailable)."""
    cfg = tiny(device="cuda", pipelines=("cpu", "ffcv", "dali", "resident", "op"), synthetic_images=256,
               batch_size=64, peers=3, batches=3)
    doc = run_augment_bench(cfg)
    check_schema(doc)
    rows = {r["pipeline"]: r for r in doc["results"]}
    for name in ("cpu", "resident", "op"):
        assert rows[name]["available"], rows[name].get("reason")
        assert rows[name]["peak_device_mb"] > 0
    assert doc["config"]["dtype_resolved"] == "bfloat16"
    assert rows["op"]["bytes_per_image"] == 3072 + 3 * 3072 * 2
    if lookup(doc["env"]["device_name"]) is not None:
        assert 0 < rows["op"]["fraction_of_peak"] < 1.5


def test_isolated_child_failure_becomes_a_row():
    row = run_isolated({"module": "os"})  # only the bench row modules may be named
    assert row["available"] is False and row["failed"] is True
    assert row["reason"] == "failed in its own process (exit status 1): unknown row module 'os'"


def test_isolate_refuses_injected_fakes():
    with pytest.raises(ValueError, match="isolate"):
        run_augment_bench(tiny(), builders={}, isolate=True)
