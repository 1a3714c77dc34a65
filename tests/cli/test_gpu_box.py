"""`pytest -m gpu` must run on a bare GPU box: torch, triton, numpy, click, rich and pytest, with
`PYTHONPATH=.` and no install -- no ffcv, DALI, numba, scipy, psutil or matplotlib. Simulate
that box by blocking those imports and collect the gpu-marked tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.cli.clirun import BLOCKER

ROOT = Path(__file__).resolve().parents[2]



def test_gpu_tests_collect_without_optional_packages(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          "--collect-only", str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(collected) >= 30, out.stdout[-2000:]   # the gpu tests of ops, loaders, trainer, bench
