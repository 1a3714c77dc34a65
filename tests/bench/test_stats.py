"""Aggregation of timings (bench.stats), the peak table (bench.peaks) and the timing harness
(bench.harness), checked with injected fake timings."""

from __future__ import annotations

import math

import pytest
import torch

from bench import harness, peaks, stats


def test_summarize_odd_and_even():
    assert stats.summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    # even count: the mean of the two middle values
    assert stats.summarize([4, 1, 3, 2]) == {"min": 1.0, "median": 2.5, "max": 4.0}
    with pytest.raises(ValueError):
        stats.summarize([])


def test_rates_per_repeat_then_summary():
    # 1000 images in 2 s, 1 s, 4 s -> 500, 1000, 250 images/s; median 500 (not 3000/7)
    r = stats.rates(1000, [2.0, 1.0, 4.0])
    assert r == [500.0, 1000.0, 250.0]
    assert stats.summarize(r)["median"] == 500.0
    assert stats.rates([10, 20], [1.0, 4.0]) == [10.0, 5.0]
    with pytest.raises(ValueError):
        stats.rates(10, [0.0])
    with pytest.raises(ValueError):
        stats.rates([1, 2, 3], [1.0])


def test_per_item_ms():
    assert stats.per_item_ms(4, [0.1, 0.2]) == pytest.approx([25.0, 50.0])


def test_ratio():
    assert stats.ratio(600.0, 100.0) == 6.0
    assert stats.ratio(1.0, None) is None
    assert stats.ratio(None, 3.0) is None
    assert stats.ratio(1.0, 0.0) is None


def test_op_bytes_and_bandwidth():
    # B=512, 32x32x3, P=3, bf16: read 512*3072 B, write 3*512*3072*2 B
    b = stats.op_bytes(512, 32, 32, 3, 2)
    assert b == 512 * 3072 + 3 * 512 * 3072 * 2 == 11_010_048
    assert stats.op_bytes(1, 2, 2, 1, 4, channels=1) == 4 + 16
    # 11 MB in 10 us = 1101 GB/s; against an H100 SXM that is a third of the peak
    bw = stats.bandwidth_gbps(b, 10e-6)
    assert bw == pytest.approx(1101.0048)
    assert stats.fraction_of_peak(bw, 3350.0) == pytest.approx(1101.0048 / 3350.0)
    assert stats.fraction_of_peak(bw, None) is None
    with pytest.raises(ValueError):
        stats.bandwidth_gbps(1, 0.0)
    # partner reads: uint8 pixels of the pasted boxes, C bytes each
    assert stats.op_bytes(512, 32, 32, 3, 2, partner_pixels=1000) == 11_010_048 + 3000
    assert stats.partner_pixels("cutnmix", [4, 0, 9], 2, 3, 32, 32) == 3 * 13
    assert stats.partner_pixels("mixup", [0, 0], 2, 3, 32, 32) == 3 * 2 * 1024
    assert stats.partner_pixels("none", [5], 1, 3, 32, 32) == 0


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA H100 80GB HBM3", 3350.0),
    ("NVIDIA H100 PCIe", 2000.0),
    ("NVIDIA H100 NVL", 3900.0),
    ("NVIDIA H200", 4800.0),
    ("NVIDIA H200 NVL", 4800.0),
    ("NVIDIA H20", 4000.0),
    ("NVIDIA GH200 480GB", 4000.0),
    ("NVIDIA A100-SXM4-40GB", 1555.0),
    ("NVIDIA A100-SXM4-80GB", 2039.0),
    ("NVIDIA A100 80GB PCIe", 1935.0),
    ("NVIDIA L40S", 864.0),
    ("NVIDIA L4", 300.0),
    ("Tesla T4", 320.0),
    ("Tesla V100-SXM2-16GB", 900.0),
])
def test_known_peaks(name, gbps):
    assert peaks.lookup(name)[0] == gbps


def test_unknown_peak():
    assert peaks.lookup("Intel(R) Xeon(R) CPU @ 2.20GHz") is None
    assert peaks.lookup(None) is None


def test_reference_peak_override_or_measured_copy():
    assert peaks.reference_peak("cpu", 123.0) == (123.0, "--peak-gbps")
    gbps, source = peaks.reference_peak("cpu", copy_bytes=1 << 20)
    assert gbps > 0 and source == "measured cpu copy bandwidth (1 MiB buffer)"


class FakeClock:
    """A clock that only moves when the workload says so: every step costs `dt` seconds."""

    def __init__(self):
        self.t = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.t


def test_time_repeats_with_fake_clock():
    clock = FakeClock()
    durations = iter([9.0, 9.0,            # warm-up steps (not timed)
                      1.0, 1.0,            # repeat 1: 2 s
                      0.5, 0.5,            # repeat 2: 1 s
                      2.0, 2.0])           # repeat 3: 4 s
    synced = []

    def step():
        clock.t += next(durations)
        return 10

    t = harness.time_repeats(step, warmup=2, per_repeat=2, repeats=3,
                             sync=lambda: synced.append(clock.t), clock=clock)
    assert t.seconds == [2.0, 1.0, 4.0]
    assert t.items == [20, 20, 20]
    assert t.warmup_seconds == 18.0
    # synchronised after the warm-up and at the end of every region, inside the region
    assert synced == [118.0, 120.0, 121.0, 125.0]
    assert stats.summarize(stats.rates(t.items, t.seconds)) == {"min": 5.0, "median": 10.0, "max": 20.0}


def test_sync_time_is_inside_the_region():
    """Work that only completes at the sync (asynchronous CUDA) is charged to the region."""
    clock = FakeClock()

    def step():
        return 1  # launches instantly

    def sync():
        clock.t += 3.0  # the queued work finishes here

    t = harness.time_repeats(step, warmup=0, per_repeat=5, repeats=2, sync=sync, clock=clock)
    assert t.seconds == [3.0, 3.0]


def test_calibrate_sizes_regions():

    clock = FakeClock()

    def step():
        clock.t += 0.01
        return 1

    # 10 ms per step, 1 s target -> 100 steps per region
    assert harness.calibrate(step, lambda: None, 1.0, clock=clock, probe_s=0.1) == 100
    # a slow step still gives at least 2 steps per region
    def slow():
        clock.t += 5.0
        return 1
    assert harness.calibrate(slow, lambda: None, 1.0, clock=clock) == 2


def test_peak_memory_cpu():
    with harness.PeakMemory("cpu", interval_s=0.01) as mem:
        block = torch.ones(8 * 2**20, dtype=torch.uint8)  # 8 MiB
        block.add_(1)
    assert mem.peak_host_mb is not None and mem.peak_host_mb > 8
    assert mem.host_method
    assert mem.peak_device_mb is None and mem.peak_device_growth_mb is None
    assert not math.isnan(mem.peak_host_mb)


def test_device_sync_cpu_is_noop():
    assert harness.device_sync("cpu")() is None


@pytest.mark.gpu
def test_peak_memory_cuda(cuda_device):
    with harness.PeakMemory(cuda_device) as mem:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device=cuda_device)
        del x
    assert mem.peak_device_mb >= 64
    assert mem.peak_device_growth_mb is not None
