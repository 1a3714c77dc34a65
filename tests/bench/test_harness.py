"""bench.harness: the registry, `measure` with fake timings, failures as rows, the flags generated
from the config dataclasses, and the import graph of bench/ (no cycle)."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import harness
from bench.augment import AugmentConfig
from bench.op_speed import OpSpeedConfig
from bench.train import TrainBenchConfig
from cnm.cmd_bench import bench as bench_cli
from pipeline.errors import CnmError

BENCH = Path(__file__).resolve().parents[2] / "bench"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_registry_keeps_order_and_refuses_duplicates():
    reg = harness.Registry("thing")

    @reg.register("b", "second letter")
    def build_b(ctx):
        return "B"

    @reg.register("a")
    def build_a(ctx):
        return "A"

    assert reg.names() == ("b", "a") and "a" in reg and "c" not in reg
    assert reg["b"].build(None) == "B" and reg.description("b") == "second letter"
    assert reg.builders() == {"b": build_b, "a": build_a}
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(build_b)


def test_measure_times_regions_and_closes():
    clock, closed = FakeClock(), []

    def build():
        def step():
            clock.t += 0.5
            return 4
        return harness.Workload(step=step, close=lambda: closed.append(True), batch_size=4,
                                bytes_per_image=10.0, notes={"k": 1})

    m = harness.measure(build, device=torch.device("cpu"), warmup=2, repeats=3,
                        steps=lambda w: 8 // w.batch_size, seconds=1.0, clock=clock, sync=lambda: None)
    assert m.steps == 2 and m.warmup_seconds == pytest.approx(1.0)
    assert m.timings.seconds == pytest.approx([1.0, 1.0, 1.0]) and m.timings.items == [8, 8, 8]
    assert closed == [True] and m.notes == {"k": 1} and m.bytes_per_image == 10.0
    row = harness.timing_row(m, unit="steps")
    assert row["images_per_s"] == pytest.approx({"min": 8.0, "median": 8.0, "max": 8.0})
    assert row["steps_per_repeat"] == 2 and row["warmup_steps"] == 2 and row["repeats"] == 3
    # no step count: regions calibrated to last about `seconds`
    m = harness.measure(build, device=torch.device("cpu"), warmup=0, repeats=1, steps=None,
                        seconds=5.0, clock=clock, sync=lambda: None)
    assert m.steps == 10


def test_build_failures_and_run_failures_become_rows():
    def unavailable(reason):
        return {"available": False, "reason": reason}

    def measure(build):
        return harness.guarded(lambda: harness.measure(build, device=torch.device("cpu"), warmup=0,
                                                       repeats=1, steps=1, seconds=1.0), unavailable)

    def refuses():
        raise harness.Unavailable("needs a GPU\nmore")

    def crashes():
        raise RuntimeError("driver exploded")

    def dies():
        def step():
            raise RuntimeError("worker died")
        return harness.Workload(step=step)

    assert measure(refuses) == {"available": False, "reason": "needs a GPU"}
    assert measure(crashes) == {"available": False,
                                "reason": "failed to start: RuntimeError: driver exploded"}
    assert measure(dies) == {"available": False, "failed": True,
                             "reason": "failed while running: RuntimeError: worker died"}


def test_add_ratios_against_the_baseline_row():
    rows = [{"name": "base", "available": True, "images_per_s": {"median": 10.0}},
            {"name": "fast", "available": True, "images_per_s": {"median": 35.0}},
            {"name": "gone", "available": False}]
    harness.add_ratios(rows, key="name", baseline="base", field="x")
    assert rows[0]["x"] == 1.0 and rows[1]["x"] == pytest.approx(3.5) and "x" not in rows[2]
    harness.add_ratios(rows[1:], key="name", baseline="base", field="y")
    assert rows[1]["y"] is None


OUTPUT_FLAGS = {"json_path", "save", "results_dir", "plot_path", "isolate", "quiet", "help"}


@pytest.mark.parametrize("command, cls", [
    (bench_cli, AugmentConfig),
    (bench_cli.commands["train"], TrainBenchConfig),
    (bench_cli.commands["op"], OpSpeedConfig),
])
def test_flags_are_the_config_fields(command, cls):
    """One flag per field (same name, same default), and nothing else but the output flags."""
    params = {p.name: p for p in command.params}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(params) - OUTPUT_FLAGS == set(fields)
    for name, f in fields.items():
        assert params[name].opts[0] == harness.flag_name(name)
        default = ",".join(f.default) if f.metadata["multiple"] else f.default
        assert params[name].default == default, name
    flags = {name: params[name].default for name in fields}
    assert harness.make_config(cls, flags) == cls()


def test_comma_lists_are_checked():
    assert harness.comma_list("a, b", ("a", "b"), "--x") == ("a", "b")
    for value, msg in (("", "empty"), ("a,c", "unknown c"), ("a,a", "twice")):
        with pytest.raises(CnmError, match=msg):
            harness.comma_list(value, ("a", "b"), "--x")


def _bench_imports(path: Path) -> set[str]:
    """The bench modules `path` imports (any level: module top or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "bench":
                out |= {a.name for a in node.names}
            elif node.module.startswith("bench."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
    return out


def test_bench_import_graph_is_acyclic():
    modules = {p.stem for p in BENCH.glob("*.py") if p.stem != "__init__"}
    graph = {m: _bench_imports(BENCH / f"{m}.py") & modules for m in modules}
    assert graph["augment"] >= {"harness", "isolated"} and "augment" not in graph["isolated"]
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_every_bench_module_imports_alone():
    """Each module in a fresh interpreter, first: no module needs another to be imported first."""
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent))
    modules = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
    failed = {}
    for m in modules:  # one at a time: each loads torch
        proc = subprocess.run([sys.executable, "-c", f"import bench.{m}"], env=env, cwd=BENCH.parent,
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            failed[m] = proc.stderr.strip().splitlines()[-1:]
    assert not failed, failed
