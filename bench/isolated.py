"""Run one benchmark row in a fresh Python process.

Pipelines leave state behind: DataLoader worker processes, DALI and FFCV threads, the CUDA
caching allocator's pool, cuDNN autotuning flags, Python heap growth. Timed one after another in
one process, a pipeline would pay for its predecessors (on a 2-core machine a lingering thread
costs half the CPU) and its "peak host memory" would include theirs. `cnm bench` therefore runs
each row as `python -m bench.isolated SPEC.json`: the child imports `spec["module"]` (the bench
module that owns the row: bench.augment, bench.train), whose `run_spec(spec)` rebuilds the row's
context and times it exactly as the in-process path does, and writes the row as JSON to
`spec["out"]`. The module is named in the spec, not imported here: no import cycle.

A child that dies (a segfault in a back-end, the OOM killer) becomes an unavailable row whose
reason is the last line of its stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import write_json

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_isolated(spec: dict) -> dict:
    """The row computed by a child process for `spec` ({"module": "bench.augment", ...}).

    On a child failure: {"available": False, "reason": "...", "failed": True}.
    """
    with tempfile.TemporaryDirectory(prefix="cnm-bench-row-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "row.json"
        spec_path.write_text(json.dumps(dict(spec, out=str(out_path))))
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "bench.isolated", str(spec_path)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, errors="replace")
        if proc.returncode == 0 and out_path.is_file():
            return json.loads(out_path.read_text())
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else "no error output"
        code = proc.returncode
        status = f"signal {-code}" if code < 0 else f"exit status {code}"
        return {"available": False, "failed": True,
                "reason": f"failed in its own process ({status}): {why}"}


ROW_MODULES = ("bench.augment", "bench.train")


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    module = spec.get("module")
    if module not in ROW_MODULES:
        raise SystemExit(f"unknown row module {module!r}")
    row = importlib.import_module(module).run_spec(spec)
    write_json(row, spec["out"])
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
