"""`cnm check`: the stage runner survives failing, crashing and hanging stages; the report
folder; and the whole command in its CPU form on a simulated bare GPU box (torch, triton,
numpy, click, rich, pytest only), run with `PYTHONPATH=.` and no install."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import check
from bench.check_stages import _pytest_counts, op_figures, ulp_distance
from cnm.cli import main
from tests.cli.clirun import BLOCKER

ROOT = Path(__file__).resolve().parents[2]



def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _result_writer(status: str, numbers: dict | None = None) -> str:
    doc = json.dumps({"status": status, "numbers": numbers or {}, "notes": [f"said {status}"]})
    return f"import sys; print('working'); open(sys.argv[1], 'w').write({doc!r})"


def test_run_stage_reports_pass_fail_crash_and_hang(tmp_path):
    res = tmp_path / "r.json"
    ok = check.run_stage("ok", _child(_result_writer("passed", {"x": 1})) + [str(res)], 60, tmp_path, res)
    assert (ok.status, ok.numbers, ok.log) == ("passed", {"x": 1}, "ok.log")
    assert "working" in (tmp_path / "ok.log").read_text()

    bad = check.run_stage("bad", _child(_result_writer("failed")) + [str(res)], 60, tmp_path, res)
    assert bad.status == "failed" and bad.notes == ["said failed"]

    crash = check.run_stage("crash", _child("print('last words'); raise SystemExit(3)"), 60, tmp_path, res)
    assert crash.status == "failed"
    assert "exited with status 3 without a result" in crash.notes[0] and "last words" in crash.notes[0]

    # a stage that hangs, with a grandchild that would outlive it: both are killed at the timeout
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, threading; "
            "p = subprocess.Popen([sys.executable, '-c', 'import threading; threading.Event().wait()']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('stuck', flush=True); "
            "threading.Event().wait()")
    t0 = time.perf_counter()
    hung = check.run_stage("hang", _child(hang), 5, tmp_path, res)
    assert hung.status == "failed" and "timed out after 5 s" in hung.notes[0], hung.notes
    assert time.perf_counter() - t0 < 60
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while _alive(grandchild) and time.monotonic() < deadline:  # reaped by init once killed
        time.sleep(0.05)
    assert not _alive(grandchild)

    odd = check.run_stage("odd", _child(_result_writer("great")) + [str(res)], 60, tmp_path, res)
    assert odd.status == "failed" and "unknown status" in odd.notes[0]


def test_an_interrupted_run_kills_the_running_stage(tmp_path):
    import signal

    pid_file = tmp_path / "stage.pid"
    code = (f"import os, threading; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            "threading.Event().wait()")

    def interrupt(signum, frame):                     # Ctrl-C once the stage is running
        if not (pid_file.exists() and pid_file.read_text()):
            signal.alarm(1)
            return
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            check.run_stage("stuck", _child(code), 600, tmp_path, tmp_path / "r.json")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not _alive(int(pid_file.read_text()))      # run_stage waited for it after the kill


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _fake_stages(monkeypatch, behaviours: dict[str, str]):
    """Replace the stage table with stages whose child runs `behaviours[name]` (a status to
    report, or 'crash')."""
    stages = tuple(check.Stage(n, f"{n} on cuda", f"{n} on cpu", 60, 60) for n in behaviours)
    monkeypatch.setattr(check, "STAGES", stages)

    def command(stage, device, result_path, work):
        what = behaviours[stage.name]
        if what == "crash":
            return _child("raise SystemExit(2)")
        return _child(_result_writer(what, {"n": 2})) + [str(result_path)]

    monkeypatch.setattr(check, "stage_command", command)
    return tuple(behaviours)


def test_run_check_writes_the_report_and_runs_every_stage_after_a_failure(tmp_path, monkeypatch):
    names = _fake_stages(monkeypatch, {"first": "crash", "second": "skipped", "third": "passed"})
    out = tmp_path / "report"
    code = check.run_check(out, device="cpu", stages=names)
    assert code == 1
    doc = json.loads((out / "check.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["stages"]] == [
        ("first", "failed"), ("second", "skipped"), ("third", "passed")]
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "first.log", "second.log", "summary.md",
                                                     "third.log"]
    summary = (out / "summary.md").read_text()
    assert "**FAILED (CPU forms only)**: 1 passed, 1 skipped, 1 failed" in summary
    assert "| third | passed |" in summary and "| n 2 | [third.log](third.log) |" in summary
    assert "## GPU checks not run here (no CUDA)" in summary and "- **second**: second on cuda" in summary


def test_run_check_passes_when_stages_pass_or_skip(tmp_path, monkeypatch):
    names = _fake_stages(monkeypatch, {"a": "passed", "b": "skipped"})
    assert check.run_check(tmp_path / "r", device="cpu", stages=names) == 0
    assert "**PASSED (CPU forms only)**" in (tmp_path / "r" / "summary.md").read_text()


def test_cli_rejects_an_unknown_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--stages", "environment,warp"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --stages: unknown warp; choose from {','.join(check.STAGE_NAMES)}")


def test_cli_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--list"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in check.STAGE_NAMES)


def test_default_out_dir_names_host_and_date():
    import datetime as dt

    name = check.default_out_dir(dt.datetime(2026, 11, 30, 16, 5, 7)).name
    assert name.startswith("check-") and name.endswith("-20261130-160507")


def test_stage_helpers_parse_pytest_and_sweep_output():
    assert _pytest_counts("3 failed, 40 passed, 2 skipped, 600 deselected in 9.1s") == {
        "failed": 3, "passed": 40, "skipped": 2, "deselected": 600}
    assert _pytest_counts("50/692 tests collected (642 deselected) in 20.11s") == {
        "collected": 50, "deselected": 642}
    row = {"pipeline": "triton kernel", "available": True, "batch": 512, "images_per_s": {"median": 2e6},
           "bandwidth_gbps": {"median": 900.0}, "fraction_of_peak": 0.25}
    assert op_figures(row) == {"batch": 512, "impl": "triton kernel", "per_s": 2e6, "gbps": 900.0,
                               "pct_peak": 25.0}
    assert op_figures({**row, "available": False, "images_per_s": None}) is None
    assert op_figures({"info": 1}) is None


def test_ulp_distance_counts_representable_steps():
    import torch

    a = torch.tensor([1.0, -2.0, 0.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, -2.0, 0.0], dtype=torch.bfloat16)
    assert ulp_distance(a, b) == 0
    b[1] = torch.nextafter(b[1].float(), torch.tensor(-3.0)).bfloat16()  # not one bf16 step
    step = (a.view(torch.int16)[1] - b.view(torch.int16)[1]).abs()
    assert ulp_distance(a, b) == int(step)
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])) == 0


@pytest.mark.slow
def test_cnm_check_cpu_form_on_a_bare_gpu_box(tmp_path):
    """The real command, every stage in its CPU form, with only the GPU box's packages."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)   # the runner sets it for its CPU children
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "cnm", "check", "--device", "cpu", "--out", str(out)],
                          check=False, cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + summary
    doc = json.loads((out / "check.json").read_text())
    assert [s["name"] for s in doc["stages"]] == list(check.STAGE_NAMES)
    for s in doc["stages"]:
        assert s["status"] in ("passed", "skipped"), s
        assert s["status"] == "passed" or s["notes"], s    # a skip says why
        assert (out / s["log"]).stat().st_size > 0
    numbers = {s["name"]: s["numbers"] for s in doc["stages"]}
    assert numbers["pytest-gpu"]["collected"] >= 30
    assert numbers["op"]["comparisons"] >= 24
    assert numbers["train"]["epochs"] == 1 and numbers["train"]["epoch1_s"] > 0
    assert numbers["allreduce-graphs"]["backend"] == "gloo" and numbers["allreduce-graphs"]["differing"] == 0
    assert "| stage | status | s | key numbers | log |" in summary
    assert "## GPU checks not run here (no CUDA)" in summary
    assert not (out / ".work").exists()


@pytest.mark.parametrize("mode", ["cutnmix", "mixup"])
def test_sub_batch_views_equal_the_big_batch_views(mode):
    """The int64 stage checks the tail of a huge batch through a small batch of those samples
    and their partners: the oracle on the small batch must equal the big batch's views."""
    import torch

    from bench.check_stages import _oracle, sub_batch_params
    from pipeline.ops import draw_params

    g = torch.Generator().manual_seed(5)
    params = draw_params(40, 3, 32, 32, mode=mode, mix_prob=0.9, generator=g)
    imgs = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g)
    keep = torch.arange(30, 40)
    sub, rows = sub_batch_params(params, keep)
    assert sorted(sub.perm.tolist()) == list(range(len(rows)))
    assert rows[:10].tolist() == keep.tolist()
    full = _oracle(imgs, params, torch.float32)
    assert torch.equal(_oracle(imgs[rows], sub, torch.float32)[:, :10], full[:, keep])
    wrong = dataclasses.replace(sub, perm=torch.arange(len(rows)))   # partners lost: must differ
    assert not torch.equal(_oracle(imgs[rows], wrong, torch.float32)[:, :10], full[:, keep])
