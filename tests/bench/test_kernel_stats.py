"""bench.kernel_stats: every variant of the Triton Cut^nMix kernel compiled offline for sm_90a and
sm_80 has no spills, at most 64 registers, writes only 16-byte global stores and stays within the
measured SASS instructions per output element (docs/performance.md#the-kernel-offline);
`--json` gives the documented keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernel_stats

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not kernel_stats.available(), reason="needs triton with compile-for-target (GPUTarget) and cuobjdump"
)

# fp16 is left out: its kernels differ from bf16's only in the final rounding convert (same
# registers and instruction counts, docs/performance.md#the-kernel-offline), and every variant is
# a cold compile of several seconds, so 24 variants instead of 36 save minutes of CI.
FAMILIES, DTYPES, LAYOUTS, ARCHS = ("box", "blend", "none"), ("bf16", "fp32"), ("peers", "grouped"), ("sm_90a", "sm_80")
# SASS instructions per output element, P=3, 32x32, as measured (max over dtypes, layouts, archs:
# box 8.83, none 5.91, blend 14.04); box and none meet issue 13's target of 10; blend cannot:
# its bit-exact float32 arithmetic alone is 9 per output (2x convert, subtract, multiply for the
# two normalised values, 2 multiplies by lam and 1-lam, 1 add), plus 2 gathers per pixel
MAX_INSTRUCTIONS = {"box": 9.0, "none": 6.0, "blend": 14.2}


@pytest.fixture(scope="module")
def rows():
    """`python -m bench.kernel_stats --json` in a child without TRITON_INTERPRET (which
    tests/conftest.py sets here, and under which @triton.jit kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "bench.kernel_stats", "--json", "--only", "(bf16|fp32)-"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    ).stdout
    return json.loads(out)


def test_json_output_keys(rows):
    keys = {"variant", "arch", "registers", "spills", "shared_bytes", "instructions_per_output_element", "store_bytes"}
    assert all(keys <= set(r) for r in rows)
    want = {(f"{f}-{d}-{lay}", a) for f in FAMILIES for d in DTYPES for lay in LAYOUTS for a in ARCHS}
    assert {(r["variant"], r["arch"]) for r in rows} == want


def test_no_spills_and_only_16_byte_stores(rows):
    for r in rows:
        assert r["spills"] == 0, r
        assert set(r["stores"]) == {"16B"} and r["store_bytes"] == 16, r
        assert 0 < r["registers"] <= 255 and r["instructions_per_output_element"] > 0, r
        # the staged source lives in shared memory (tl.gather): read from global memory once
        assert r["shared_bytes"] > 0, r


def test_registers_and_instructions_per_output(rows):
    for r in rows:
        assert r["registers"] <= 64, r
        assert r["instructions_per_output_element"] <= MAX_INSTRUCTIONS[r["variant"].split("-")[0]], r
