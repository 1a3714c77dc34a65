"""pipeline.backends: lazy, never-raising access to ffcv / DALI / triton."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import backends
from pipeline.errors import CnmError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["ffcv", "nvidia.dali", "triton"])
def test_importing_a_backend_leaves_torch_threads_alone(name):
    """ffcv's import sets torch's intra-op threads to 1 for the whole process; through
    `backends.optional` the count must be what it was (fresh process: nothing imported yet)."""
    pytest.importorskip(name)
    code = ("import torch; torch.set_num_threads(3); from pipeline import backends; "
            f"m = backends.optional({name!r}); print(m is not None, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split()[-2:] == ["True", "3"]


def test_missing_backend_is_none_and_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)   # import ffcv now raises ImportError
    backends.reset_cache()
    try:
        assert backends.optional("ffcv") is None and not backends.available("ffcv")
        with pytest.raises(CnmError, match=r"pip install 'cnm\[ffcv\]'"):
            backends.require("ffcv", "the ffcv loader")
    finally:
        backends.reset_cache()
