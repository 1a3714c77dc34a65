"""`cnm check`: validate this machine's cnm in one command and write a report folder.

Every stage runs in its own subprocess (`python -m bench.check_stages STAGE`) with its own
timeout, in its own process group, so a stage that fails, crashes or hangs never stops the
rest. Each stage writes one log (`<stage>.log`: its stdout and stderr) and a result (status,
key numbers, notes) that the runner gathers into `check.json` and the table of `summary.md`.
Without CUDA the stages run their CPU form, and the summary names the GPU checks not run.
What each stage checks: `bench/check_stages.py`; see docs/cli.md#cnm-check.

Exit status of `run_check`: 0 when every stage passed or was skipped for a stated reason,
1 when any failed (including a timeout or a crash).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("passed", "skipped", "failed")


@dataclass(frozen=True)
class Stage:
    """One check: `name` (its log is `<name>.log`), what it checks on CUDA and on the CPU,
    and its timeout in seconds on each."""

    name: str
    cuda_check: str
    cpu_check: str
    cuda_timeout_s: float
    cpu_timeout_s: float


# In run order. The CUDA timeouts sum to more than 8 minutes, but the typical times on one
# H100/H200 (about 4-6 minutes together) fit; a timeout only bounds a stage that hangs.
STAGES = (
    Stage("environment", "driver, CUDA, cuDNN, torch, triton, device, git commit",
          "torch, triton, git commit (no CUDA)", 60, 60),
    Stage("pytest-gpu", "`pytest -m gpu` on tests/", "`pytest -m gpu --collect-only`: the GPU tests collect", 240, 120),
    Stage("op", "Triton == reference, bit-exact, every mode and dtype at B 1, 4097, 65536; "
                "int64 offsets past 2^31 output elements",
          "Triton interpreter == reference at B 1, 3 (1 ulp for fp16/bf16); torch == reference at B 512; "
          "the kernel's int64 offsets at B 8", 240, 120),
    Stage("op-sweep", "op bandwidth sweep, B 512..262144: GB/s and % of the device's peak",
          "op speed sweep, B 64..128 on the CPU (images/s)", 120, 90),
    Stage("bench", "`cnm bench`, every pipeline available", "`cnm bench` tiny, on the CPU", 180, 90),
    Stage("bench-train", "`cnm bench train`: eager -> channels-last -> bf16 -> CUDA graphs -> grouped",
          "`cnm bench train` tiny, eager fp32 on the CPU", 180, 90),
    Stage("train", "2-epoch `cnm train` on a 50k synthetic set, CUDA defaults: s/epoch",
          "1-epoch `cnm train` on 64 synthetic images", 300, 120),
    Stage("ema-capture", "EMA teacher update captured in a CUDA graph under sync debug mode 'error' == eager",
          "EMA teacher update == its formula", 90, 60),
    Stage("allreduce-graphs", "world-1 NCCL group: gradient all-reduce between the two captured step graphs "
                              "== eager", "world-1 gloo group: gradient all-reduce step == step without it", 120, 60),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass
class StageResult:
    """What one stage reported. status: passed | skipped | failed; numbers: key figures
    (JSON values); notes: lines for the summary (what was not run and why, failures)."""

    name: str
    status: str
    seconds: float
    log: str
    numbers: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    form: str = "cpu"


def default_out_dir(now: _dt.datetime | None = None) -> Path:
    """`check-<host>-<YYYYmmdd-HHMMSS>` in the current directory."""
    now = now or _dt.datetime.now()
    host = platform.node().split(".")[0] or "host"
    return Path(f"check-{host}-{now:%Y%m%d-%H%M%S}")


def resolve_device(device: str) -> tuple[str, str | None]:
    """("cuda" | "cpu", reason when CUDA was wanted or auto but is unavailable)."""
    try:
        import torch

        cuda = torch.cuda.is_available()
        why = None if cuda else f"torch {torch.__version__} sees no CUDA device"
    except Exception as e:  # noqa: BLE001 - a broken torch is what the environment stage reports
        cuda, why = False, f"torch fails to import: {e.__class__.__name__}: {e}"
    if device == "cpu":
        return "cpu", None
    if device == "cuda" and not cuda:
        return "cuda", why   # the stages then fail, saying why
    return ("cuda", None) if cuda else ("cpu", why)


def stage_command(stage: Stage, device: str, result_path: Path, work_dir: Path) -> list[str]:
    """The child command line of one stage."""
    return [sys.executable, "-m", "bench.check_stages", stage.name, "--device", device,
            "--result", str(result_path), "--work", str(work_dir)]


def child_env(device: str) -> dict:
    """This process's environment with the checkout first on PYTHONPATH (no install needed);
    on the CPU, Triton's interpreter (TRITON_INTERPRET=1) so the kernel runs on CPU tensors, and
    one thread per process unless OMP_NUM_THREADS says otherwise (the CPU form is a functional
    check, not a measurement; on a loaded machine more threads make it many times slower)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tail(path: Path, lines: int = 3) -> list[str]:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return []
    return [ln.strip()[:300] for ln in text[-lines:] if ln.strip()]


def run_stage(name: str, argv: list[str], timeout_s: float, out_dir: Path, result_path: Path,
              env: dict | None = None, form: str = "cpu") -> StageResult:
    """Run one stage child; its stdout+stderr go to `<out_dir>/<name>.log`. A child that
    times out (its whole process group is killed), exits without a result, or reports a
    status outside STATUSES is a failure."""
    log = out_dir / f"{name}.log"
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        f.write(f"$ {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO_ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)   # the stage and whatever it started
            rc = proc.wait()
        except BaseException:                     # Ctrl-C: its own session would outlive us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    seconds = time.perf_counter() - t0
    res = StageResult(name, "failed", round(seconds, 1), log.name, form=form)
    if timed_out:
        res.notes.append(f"timed out after {timeout_s:g} s (killed); last log lines: "
                         + " | ".join(_tail(log)))
        return res
    try:
        doc = json.loads(result_path.read_text())
    except (OSError, ValueError):
        res.notes.append(f"exited with status {rc} without a result; last log lines: " + " | ".join(_tail(log)))
        return res
    finally:
        result_path.unlink(missing_ok=True)
    if doc.get("status") not in STATUSES:
        res.notes.append(f"reported an unknown status {doc.get('status')!r}")
        return res
    res.status = doc["status"]
    res.numbers = doc.get("numbers", {})
    res.notes = list(doc.get("notes", []))
    if rc != 0 and res.status != "failed":
        res.status = "failed"
        res.notes.append(f"exited with status {rc} after reporting {doc['status']}")
    return res


def _fmt_number(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def key_numbers(numbers: dict) -> str:
    return ", ".join(f"{k} {_fmt_number(v)}" for k, v in numbers.items())


def summary_markdown(doc: dict) -> str:
    """The report a person reads: verdict, table (stage, status, s, key numbers, log), what
    was not run, and the notes of every failed or skipped stage."""
    lines = [f"# cnm check: {doc['host']}, {doc['started']}", ""]
    counts = {s: sum(r["status"] == s for r in doc["stages"]) for s in STATUSES}
    verdict = "FAILED" if counts["failed"] else "PASSED"
    if doc["device"] == "cpu":
        verdict += " (CPU forms only)"
    lines += [(f"**{verdict}**: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed "
              f"in {doc['seconds']:.0f} s on {doc['device_name']} (`{doc['device']}` form of every stage); "
              f"commit {doc.get('commit') or 'unknown'}."), ""]
    if doc.get("device_note"):
        lines += [(f"No CUDA: {doc['device_note']}. " + ("Every stage ran its CPU form; the GPU checks listed "
                   "below were NOT run." if doc["device"] == "cpu" else "The GPU stages fail.")), ""]
    lines += ["| stage | status | s | key numbers | log |", "|---|---|---:|---|---|"]
    for r in doc["stages"]:
        nums = key_numbers(r["numbers"]).replace("|", "/")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {nums} | [{r['log']}]({r['log']}) |")
    lines.append("")
    if doc["device"] == "cpu":
        lines += ["## GPU checks not run here (no CUDA)", ""]
        lines += [f"- **{s['name']}**: {s['cuda_check']}" for s in doc["stage_checks"]]
        lines.append("")
    noted = [r for r in doc["stages"] if r["notes"]]
    if noted:
        lines += ["## Notes", ""]
        for r in noted:
            lines += [f"- **{r['name']}** ({r['status']}): {n}" for n in r["notes"]]
        lines.append("")
    lines += [("Rerun: `cnm check --out DIR` (or `PYTHONPATH=. python -m cnm check`); one stage: "
              "`--stages NAME`."), ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_check(out_dir: Path, device: str = "auto", stages: tuple[str, ...] = STAGE_NAMES,
              progress=None) -> int:
    """Run `stages` (names from STAGE_NAMES, in STAGES order) and write `out_dir`/summary.md,
    check.json and one log per stage. Returns the exit status (0 passed/skipped, 1 failed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".work"
    work.mkdir(exist_ok=True)
    form, note = resolve_device(device)
    env = child_env(form)
    started = _dt.datetime.now().astimezone()
    chosen = [s for s in STAGES if s.name in stages]
    doc = {"host": platform.node(), "started": started.isoformat(timespec="seconds"), "device": form,
           "device_note": note, "device_name": "CPU", "commit": None, "seconds": 0.0,
           "stage_checks": [{"name": s.name, "cuda_check": s.cuda_check, "cpu_check": s.cpu_check}
                            for s in chosen],
           "stages": []}
    t0 = time.perf_counter()
    for stage in chosen:
        if progress:
            progress(f"[{stage.name}] {stage.cuda_check if form == 'cuda' else stage.cpu_check}")
        timeout = stage.cuda_timeout_s if form == "cuda" else stage.cpu_timeout_s
        res = run_stage(stage.name, stage_command(stage, form, work / f"{stage.name}.json", work), timeout,
                        out_dir, work / f"{stage.name}.json", env, form)
        if stage.name == "environment":
            doc["device_name"] = res.numbers.get("device", doc["device_name"])
            doc["commit"] = res.numbers.get("commit")
        doc["stages"].append(res.__dict__)
        doc["seconds"] = round(time.perf_counter() - t0, 1)
        if progress:
            progress(f"[{stage.name}] {res.status} in {res.seconds:.1f} s  {key_numbers(res.numbers)}")
        _atomic_write(out_dir / "check.json", json.dumps(doc, indent=1, default=str) + "\n")
        _atomic_write(out_dir / "summary.md", summary_markdown(doc))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "failed" for r in doc["stages"]) else 0
