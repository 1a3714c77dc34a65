"""Theoretical peak memory bandwidth of known accelerators, looked up by device name.

Figures are the vendors' datasheet numbers for the on-package memory (HBM or GDDR), in GB/s
(10^9 bytes per second). `cnm bench` divides the achieved bandwidth of the fused op by this
peak. The name is what `torch.cuda.get_device_name()` reports (e.g. "NVIDIA H100 80GB HBM3",
"NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB"); the first pattern that matches wins, so the more
specific patterns come first. Unknown devices (and every CPU: DRAM bandwidth depends on the
board, not the name) have no peak; `cnm bench --peak-gbps X` supplies one by hand.
"""

from __future__ import annotations

import re

# (pattern on the lower-cased name, peak GB/s, what the figure is for)
KNOWN_PEAKS: list[tuple[str, float, str]] = [
    (r"gh200.*144", 4900.0, "GH200 144GB HBM3e"),
    (r"gh200", 4000.0, "GH200 96GB HBM3"),
    (r"b200|b100", 8000.0, "B200 HBM3e"),
    (r"h200", 4800.0, "H200 141GB HBM3e"),
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
    (r"\bl4\b", 300.0, "L4 GDDR6"),
    (r"a10g?\b", 600.0, "A10/A10G GDDR6"),
    (r"rtx 6000 ada", 960.0, "RTX 6000 Ada GDDR6"),
    (r"a6000", 768.0, "RTX A6000 GDDR6"),
    (r"4090", 1008.0, "GeForce RTX 4090 GDDR6X"),
    (r"3090", 936.0, "GeForce RTX 3090 GDDR6X"),
    (r"\bt4\b", 320.0, "T4 GDDR6"),
]


def peak_bandwidth_gbps(device_name: str | None) -> float | None:
    """Datasheet peak memory bandwidth in GB/s of the named device, or None if unknown."""
    entry = lookup(device_name)
    return None if entry is None else entry[0]


def lookup(device_name: str | None) -> tuple[float, str] | None:
    """(peak GB/s, what it is) for the first known pattern matching `device_name`, else None."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, gbps, label in KNOWN_PEAKS:
        if re.search(pattern, name):
            return gbps, label
    return None
