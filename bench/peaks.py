"""Theoretical peak memory bandwidth of known accelerators, looked up by device name.

Figures are the vendors' datasheet numbers for the on-package memory (HBM or GDDR), in GB/s
(10^9 bytes per second). `cnm bench` divides the achieved bandwidth of the fused op by this
peak. The name is what `torch.cuda.get_device_name()` reports (e.g. "NVIDIA H100 80GB HBM3",
"NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB"); the first pattern that matches wins, so the more
specific patterns come first. Unknown devices (and every CPU: DRAM bandwidth depends on the
board, not the name) have no datasheet peak; `reference_peak` then measures the device's own
copy bandwidth (`measured_copy_gbps`), and `--peak-gbps X` supplies one by hand.
"""

from __future__ import annotations

import re

import torch

from bench import harness

# (pattern on the lower-cased name, peak GB/s, what the figure is for)
KNOWN_PEAKS: list[tuple[str, float, str]] = [
    (r"gh200.*144", 4900.0, "GH200 144GB HBM3e"),
    (r"gh200", 4000.0, "GH200 96GB HBM3"),
    (r"b200|b100", 8000.0, "B200 HBM3e"),
    (r"h200", 4800.0, "H200 141GB HBM3e (SXM and NVL)"),
    (r"h20\b", 4000.0, "H20 96GB HBM3"),
    (r"h100.*nvl", 3900.0, "H100 NVL 94GB HBM3"),
    (r"h100.*pcie", 2000.0, "H100 PCIe 80GB HBM2e"),
    (r"h100|h800", 3350.0, "H100 SXM5 80GB HBM3"),
    (r"a100.*pcie.*80|a100.*80.*pcie", 1935.0, "A100 PCIe 80GB HBM2e"),
    (r"a100.*80", 2039.0, "A100 SXM4 80GB HBM2e"),
    (r"a100", 1555.0, "A100 40GB HBM2"),
    (r"a800.*80", 2039.0, "A800 80GB HBM2e"),
    (r"a30\b", 933.0, "A30 24GB HBM2"),
    (r"v100", 900.0, "V100 HBM2"),
    (r"l40", 864.0, "L40/L40S GDDR6"),
    (r"l20\b", 864.0, "L20 GDDR6"),
    (r"\bl4\b", 300.0, "L4 GDDR6"),
    (r"a10g?\b", 600.0, "A10/A10G GDDR6"),
    (r"rtx 6000 ada", 960.0, "RTX 6000 Ada GDDR6"),
    (r"a6000", 768.0, "RTX A6000 GDDR6"),
    (r"4090", 1008.0, "GeForce RTX 4090 GDDR6X"),
    (r"3090", 936.0, "GeForce RTX 3090 GDDR6X"),
    (r"\bt4\b", 320.0, "T4 GDDR6"),
]


def lookup(device_name: str | None) -> tuple[float, str] | None:
    """(peak GB/s, what it is) for the first known pattern matching `device_name`, else None."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, gbps, label in KNOWN_PEAKS:
        if re.search(pattern, name):
            return gbps, label
    return None


def measured_copy_gbps(device: torch.device | str, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth of `device` in GB/s: the median over `repeats` regions of
    back-to-back `copy_` calls of an `nbytes` uint8 buffer, counting 2*nbytes (read + write)
    per copy (the bandwidth an unknown device can reach; on a CPU, its memcpy bandwidth)."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def step() -> int:
        dst.copy_(src)
        return 1

    sync = harness.device_sync(device)
    t = harness.time_repeats(step, warmup=2, per_repeat=5, repeats=repeats, sync=sync)
    rates = sorted(2 * nbytes * n / s / 1e9 for n, s in zip(t.items, t.seconds))
    return rates[len(rates) // 2]


def reference_peak(device: torch.device | str, override: float | None = None, *,
                   copy_bytes: int = 1 << 28) -> tuple[float, str]:
    """(peak GB/s, where it comes from) for `device`: `override` ("--peak-gbps"), else the
    datasheet figure of a known CUDA device, else the measured copy bandwidth of the device."""
    device = torch.device(device)
    if override is not None:
        return float(override), "--peak-gbps"
    if device.type == "cuda":
        known = lookup(torch.cuda.get_device_name(device))
        if known is not None:
            return known[0], f"datasheet: {known[1]}"
    gbps = measured_copy_gbps(device, copy_bytes)
    return gbps, f"measured {device.type} copy bandwidth ({copy_bytes >> 20} MiB buffer)"
