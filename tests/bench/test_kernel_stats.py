"""bench.kernel_stats: the Triton Cut^nMix kernel compiled offline for sm_90a and sm_80 has no
spills and writes only 16-byte global stores; `--json` gives the documented keys."""

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

# every mode family; both layouts; 16-bit and 32-bit outputs (fp16 compiles like bf16)
VARIANTS = "^(box|blend|none)-(bf16-peers|fp32-grouped)$"


@pytest.fixture(scope="module")
def rows():
    """`python -m bench.kernel_stats --json` in a child without TRITON_INTERPRET (which
    tests/conftest.py sets here, and under which @triton.jit kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "bench.kernel_stats", "--json", "--only", VARIANTS],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    ).stdout
    return json.loads(out)


def test_json_output_keys(rows):
    keys = {"variant", "arch", "registers", "spills", "shared_bytes", "instructions_per_output_element", "store_bytes"}
    assert all(keys <= set(r) for r in rows)
    want = {(f"{f}-{v}", a) for f in ("box", "blend", "none") for v in ("bf16-peers", "fp32-grouped")
            for a in ("sm_90a", "sm_80")}
    assert {(r["variant"], r["arch"]) for r in rows} == want


def test_no_spills_and_only_16_byte_stores(rows):
    for r in rows:
        assert r["spills"] == 0, r
        assert set(r["stores"]) == {"16B"} and r["store_bytes"] == 16, r
        assert 0 < r["registers"] <= 255 and r["instructions_per_output_element"] > 0, r
        # the staged source lives in shared memory (tl.gather): read from global memory once
        assert r["shared_bytes"] > 0, r
