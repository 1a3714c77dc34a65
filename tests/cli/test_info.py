"""`cnm info` and `pipeline.environment.describe`: complete, and never crashing when the
optional back-ends (ffcv, DALI, triton) are missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnm.cli import main
from cnm.cmd_info import cuda_words
from pipeline import backends, environment

ROOT = Path(__file__).resolve().parents[2]

HIDDEN = ("ffcv", "nvidia.dali", "nvidia", "triton")


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


@pytest.fixture
def hidden_backends(monkeypatch):
    """ffcv, nvidia.dali and triton cannot be imported (as on a machine without them)."""
    for name in HIDDEN:
        monkeypatch.setitem(sys.modules, name, None)
    backends.reset_cache()
    yield
    monkeypatch.undo()
    backends.reset_cache()


def test_describe_is_complete_and_json_able():
    env = environment.describe()
    json.dumps(env)
    assert env["python"].count(".") == 2 and env["cpu_count"] >= 1
    assert env["cpu_model"] is None or isinstance(env["cpu_model"], str)
    assert set(env["packages"]) >= {"torch", "numpy", "ffcv", "nvidia-dali", "triton"}
    assert env["packages"]["torch"] and env["packages"]["numpy"]
    assert set(env["cuda"]) >= {"available", "device", "devices", "device_count", "torch_cuda"}
    assert list(env["loaders"]) == ["ffcv", "dali", "resident", "cpu"]
    assert list(env["kernels"]) == ["triton", "torch", "reference"]
    assert {"resident", "cpu"} <= set(env["usable_loaders"])
    assert {"torch", "reference"} <= set(env["usable_kernels"])
    assert env["usable_loaders"] == [k for k, v in env["loaders"].items() if v["usable"]]
    if env["git"] is not None:
        assert len(env["git"]["commit"]) == 40


def test_describe_with_backends_hidden(hidden_backends):
    env = environment.describe()
    assert env["usable_loaders"] == ["resident", "cpu"]
    assert env["usable_kernels"] == ["torch", "reference"]
    for name, extra in (("ffcv", "ffcv"), ("dali", "dali")):
        note = env["loaders"][name]["note"]
        assert ("fails to import" in note) or (f"cnm[{extra}]" in note), note
    assert not env["kernels"]["triton"]["usable"]


def test_info_table(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0 and err == ""
    for word in ("torch", "numpy", "CUDA", "CPUs", "loaders", "ffcv", "dali", "resident", "cpu", "triton",
                 "reference"):
        assert word in out, word


def test_info_with_backends_hidden(capsys, hidden_backends):
    code, out, err = run(capsys, "info")
    assert code == 0 and "Traceback" not in out + err
    code, out, _ = run(capsys, "info", "--json", "--check")
    env = json.loads(out)
    assert code == 0 and env["usable_loaders"] == ["resident", "cpu"]
    assert env["loaders"]["ffcv"]["usable"] is False and env["loaders"]["dali"]["usable"] is False


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    if not backends.available("triton"):
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = environment.kernels_info(cuda=False)["triton"]
    assert k["usable"] and "interpreter" in k["note"]
    monkeypatch.delenv("TRITON_INTERPRET")
    k = environment.kernels_info(cuda=False)["triton"]
    assert not k["usable"] and "needs CUDA" in k["note"]
    assert environment.kernels_info(cuda=True)["triton"]["usable"]


def test_broken_torch_cuda_query_does_not_crash(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    info = environment.cuda_info()
    assert info["available"] is False and "driver exploded" in info["error"]


def test_info_reports_a_torch_that_fails_to_import():
    """`cnm info` diagnoses a broken install: a torch whose import raises is named, not a crash."""
    code = ("import json, sys\nclass Broken:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n            raise ImportError('libtorch_cpu.so: cannot open shared object')\n"
            "sys.meta_path.insert(0, Broken())\nfrom cnm.cli import main\nmain(['info', '--json'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    env = json.loads(p.stdout)
    assert "libtorch_cpu.so" in env["cuda"]["error"] and env["cuda"]["available"] is False


def test_git_info_outside_a_checkout(tmp_path):
    assert environment.git_info(tmp_path) is None


@pytest.mark.parametrize("check", [False, True])
def test_info_imports_no_backend_unless_asked(check):
    """`cnm info` answers without importing ffcv / DALI / triton (ffcv alone takes ~5 s);
    `--check` imports them to tell whether they work. A fresh process: nothing imported yet."""
    code = ("import json, sys\nfrom cnm.cli import main\ntry:\n    main(['info', '--json'" + (", '--check'" if check else "")
            + "])\nexcept SystemExit:\n    pass\nprint(json.dumps([m for m in ('ffcv', 'nvidia.dali', 'triton') "
              "if m in sys.modules]), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=True)
    imported = json.loads(p.stderr.strip().splitlines()[-1])
    env = json.loads(p.stdout)
    installed = [m for m in ("ffcv", "nvidia.dali", "triton") if backends.version(m) is not None]
    if check:
        assert set(imported) >= {m for m in installed if backends.available(m)}
        assert all(row["usable"] in (True, False) for row in env["loaders"].values())
    else:
        assert imported == []
        for loader, name in (("ffcv", "ffcv"), ("dali", "nvidia.dali")):
            row = env["loaders"][loader]
            if name in installed:
                assert row["usable"] is None and "cnm info --check" in row["note"]
            else:
                assert row["usable"] is False and "pip install" in row["note"]
            assert loader not in env["usable_loaders"]


def test_cuda_row_in_plain_words():
    base = {"available": False, "torch_cuda": None, "device_count": 0, "devices": [], "device": None,
            "capability": None, "bf16": False}
    assert cuda_words(base, "2.13.0+cpu") == "no: this torch (2.13.0+cpu) is a CPU-only build; cnm trains on the CPU"
    assert cuda_words({**base, "torch_cuda": "12.4"}, "2.13.0").startswith(
        "no: torch is built for CUDA 12.4 but sees no GPU")
    gpus = {**base, "available": True, "torch_cuda": "12.4", "device_count": 2, "devices": ["NVIDIA H200"] * 2,
            "device": "NVIDIA H200", "capability": "9.0", "bf16": True}
    assert cuda_words(gpus, "2.13.0") == ("yes, 2 GPUs: NVIDIA H200 (compute capability 9.0, bf16 supported); "
                                          "torch built for CUDA 12.4")
    assert cuda_words({**base, "error": "RuntimeError: driver exploded"}, "2.13.0").startswith(
        "cannot tell: torch fails to query CUDA (RuntimeError: driver exploded)")
