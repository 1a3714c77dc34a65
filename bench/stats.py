"""Aggregation of benchmark timings: rates, min/median/max, ratios, bandwidth.

Pure functions of numbers, so the figures `cnm bench` prints can be checked with injected fake
timings (tests/bench/test_stats.py). Conventions:

- A *repeat* is one timed region: `items` units of work (images, steps) in `seconds` of wall
  time, measured after warm-up with the device synchronised at the end.
- Rates are computed per repeat and then summarised (min/median/max over repeats); the median of
  an even number of repeats is the mean of the two middle values (`statistics.median`).
- Ratios compare medians (`ratio(a, b) = median_a / median_b`).
- Bandwidth is bytes moved per second in GB/s (10^9 B/s), compared with the datasheet peak.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from pipeline.choices import BOX_MODES


def summarize(values: Iterable[float]) -> dict[str, float]:
    """{"min", "median", "max"} of a non-empty sequence of numbers."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values")
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def rates(items: Sequence[float] | float, seconds: Sequence[float]) -> list[float]:
    """Per-repeat throughput `items_i / seconds_i` (items: one count for all repeats, or one each).

    A repeat of zero (or negative, from a broken clock) duration has no finite rate: ValueError.
    """
    counts = [items] * len(seconds) if isinstance(items, (int, float)) else list(items)
    if len(counts) != len(seconds):
        raise ValueError(f"rates: {len(counts)} item counts for {len(seconds)} repeats")
    out = []
    for n, s in zip(counts, seconds):
        if not s > 0:
            raise ValueError(f"rates: a timed region lasted {s} s; the clock must advance")
        out.append(float(n) / float(s))
    return out


def per_item_ms(items: Sequence[float] | float, seconds: Sequence[float]) -> list[float]:
    """Per-repeat milliseconds per item (e.g. ms/step): `1000 * seconds_i / items_i`."""
    return [1000.0 / r for r in rates(items, seconds)]


def ratio(value: float | None, baseline: float | None) -> float | None:
    """`value / baseline`, or None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or not baseline > 0 or math.isnan(value):
        return None
    return float(value) / float(baseline)


def op_bytes(batch: int, height: int, width: int, peers: int, out_itemsize: int,
             channels: int = 3, partner_pixels: int = 0) -> int:
    """Memory traffic of one Cut^nMix call on a batch, in bytes.

    Reads the uint8 source once (B*H*W*C bytes), reads `partner_pixels` uint8 pixels of the
    partners (the boxes pasted into the views, `partner_pixels`; 0: the minimum traffic) and
    writes P views of B*C*H*W elements of the output dtype. Labels, the permutation and the
    random parameters are O(B) and left out.
    """
    src = batch * height * width * channels
    return src + partner_pixels * channels + peers * batch * channels * height * width * out_itemsize


def partner_pixels(mode: str, box_areas: Sequence[int], mixed: int, peers: int, height: int,
                   width: int) -> int:
    """Pixels one call reads from the partner images, counted per peer view.

    box modes (cutnmix, cutmix): every view of a mixed sample reads its box from the partner
    (box_areas: box_h*box_w per sample, 0 where not mixed); mixup: every view of a mixed sample
    blends the whole partner image (`mixed` samples); none: nothing.
    """
    if mode in BOX_MODES:
        return peers * int(sum(box_areas))
    if mode == "mixup":
        return peers * int(mixed) * height * width
    return 0


def bandwidth_gbps(bytes_per_call: float, seconds_per_call: float) -> float:
    """Achieved bandwidth in GB/s (10^9 bytes per second)."""
    if not seconds_per_call > 0:
        raise ValueError("bandwidth_gbps: duration must be positive")
    return bytes_per_call / seconds_per_call / 1e9


def fraction_of_peak(achieved_gbps: float | None, peak_gbps: float | None) -> float | None:
    """achieved / peak (0.5 = half the datasheet bandwidth), or None when the peak is unknown."""
    return ratio(achieved_gbps, peak_gbps)
