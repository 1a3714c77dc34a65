"""Run one benchmark row in a fresh Python process.

Pipelines leave state behind: DataLoader worker processes, DALI and FFCV threads, the CUDA
caching allocator's pool, cuDNN autotuning flags, Python heap growth. Timed one after another in
one process, a pipeline would pay for its predecessors (on a 2-core machine a lingering thread
costs half the CPU) and its "peak host memory" would include theirs. `cnm bench` therefore runs
each row as `python -m bench.isolated SPEC.json`: the child rebuilds the row's context from the
spec, times it exactly as the in-process path does (`bench.augment.run_guarded`,
`bench.train.run_variant_guarded`) and writes the row as JSON to `spec["out"]`.

A child that dies (a segfault in a back-end, the OOM killer) becomes an unavailable row whose
reason is the last line of its stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_isolated(spec: dict) -> dict:
    """The row computed by a child process for `spec` ({"kind": "augment" | "train", ...}).

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


def _child(spec_path: str) -> int:
    import time

    spec = json.loads(Path(spec_path).read_text())
    if spec["kind"] == "augment":
        from bench import augment

        cfg = augment.config_from_dict(spec["config"])
        ctx = augment.context_for(cfg, Path(spec["data_dir"]))
        peak = tuple(spec["peak"]) if spec.get("peak") else None
        row = augment.run_guarded(spec["name"], augment.BUILDERS[spec["name"]], ctx,
                                  clock=time.perf_counter, peak=peak)
    elif spec["kind"] == "train":
        from bench import train

        cfg = train.config_from_dict(spec["config"])
        row = train.run_variant_guarded(spec["variant"], cfg)
    else:
        raise SystemExit(f"unknown spec kind {spec['kind']!r}")
    out = Path(spec["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, allow_nan=False))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
