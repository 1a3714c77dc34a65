"""`cnm bench` and `cnm bench train` through the real CLI entry point (cnm.cli.main)."""

from __future__ import annotations

import json
import sys

import pytest

from cnm.cli import main
from pipeline import backends


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


TINY = ["--device", "cpu", "--batch-size", "8", "--peers", "2", "--repeats", "1", "--batches", "2",
        "--warmup", "1", "--synthetic-images", "32", "-q"]


def test_bench_json_and_save(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # the ffcv row: unavailable, and no .beton to write
    backends.reset_cache()
    try:
        out_json = tmp_path / "b.json"
        code, out, err = run_cli(["bench", *TINY, "--pipelines", "cpu,ffcv,op", "--json", str(out_json),
                                  "--save", "--results-dir", str(tmp_path / "results")], capsys)
    finally:
        monkeypatch.undo()
        backends.reset_cache()
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert [r["pipeline"] for r in doc["results"]] == ["cpu", "ffcv", "op"]
    rows = {r["pipeline"]: r for r in doc["results"]}
    assert rows["cpu"]["available"] and rows["op"]["available"], doc["results"]
    assert rows["ffcv"]["available"] is False and "cnm[ffcv]" in rows["ffcv"]["reason"]
    assert set(rows["op"]["images_per_s"]) == {"min", "median", "max"}
    saved = list((tmp_path / "results").iterdir())
    assert len(saved) == 1 and saved[0].name.endswith(".json") and "-cpu" in saved[0].name
    assert json.loads(saved[0].read_text())["results"] == doc["results"]
    assert "saved " in err
    assert "images/s" in out and "cpu" in out  # the table went to stdout


def test_bench_train_json(tmp_path, capsys):
    pytest.importorskip("trainer.step")
    out_json = tmp_path / "t.json"
    code, out, err = run_cli(["bench", "train", "--arch", "resnet20", "--peers", "2", "--batch-size", "8",
                              "--device", "cpu", "--num-classes", "10", "--repeats", "1", "--steps", "1",
                              "--warmup", "1", "--variants", "eager-fp32,+cuda-graphs", "-q",
                              "--json", str(out_json)], capsys)
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["bench"] == "train"
    rows = {r["variant"]: r for r in doc["results"]}
    assert rows["eager-fp32"]["available"], rows["eager-fp32"].get("reason")
    assert rows["+cuda-graphs"]["available"] is False
    assert "ms/step" in out


@pytest.mark.parametrize("argv, msg", [
    (["bench", "--pipelines", "cpu,warp"], "unknown warp"),
    (["bench", "--pipelines", ""], "empty"),
    (["bench", "--batches", "2", "--images", "10"], "not both"),
    (["bench", "--device", "cuda:0"] if not __import__("torch").cuda.is_available() else
     ["bench", "--device", "tpu"], "device"),
    (["bench", "train", "--variants", "warp"], "unknown warp"),
    (["bench", "train", "--arch", "nope", "--device", "cpu"], "nope"),
    (["bench", "--data", "/nonexistent/cnm-data", "--pipelines", "op", "--device", "cpu"], "does not exist"),
])
def test_bad_input_is_one_line(argv, msg, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 1
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], err
    assert "Traceback" not in err


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(backends, "_cache", {})
    code, out, err = run_cli(["bench", *TINY, "--pipelines", "op", "--plot", str(tmp_path / "p.png"),
                              "--json", str(tmp_path / "b.json")], capsys)
    assert code == 1
    assert err.strip() == "error: matplotlib is not installed (needed for --plot): pip install 'cnm[plot]'"
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_help_lists_train(capsys):
    code, out, err = run_cli(["bench", "--help"], capsys)
    assert code == 0
    assert "train" in out and "--pipelines" in out
