"""bench/loader_epoch.py runs end to end on a tiny set (a smoke test; the figures are not checked)."""

from __future__ import annotations

import json

from bench import loader_epoch
from pipeline.data.manifest import write_dataset
from tests.pipeline.loaders.conftest import indexed_split


def test_loader_epoch_bench_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "r.json"
    # a prepared set of the requested size is used as it is (no .beton: faster to write)
    write_dataset(tmp_path / "d", {"train": indexed_split(300, 0), "test": indexed_split(10, 0)},
                  dataset="x", class_names=[str(i) for i in range(10)], beton=False)
    rc = loader_epoch.main(["--data", str(tmp_path / "d"), "--n", "300", "--batch-size", "64", "--epochs", "2",
                            "--device", "cpu", "--only", "resident", "cpu", "--workers", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| resident | raw |" in text and "| cpu | raw |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["loader"] for r in rows] == ["resident", "cpu"]
    assert all(r["images"] == 300 // 64 * 64 and len(r["epochs_s"]) == 2 and r["epoch_s"] > 0 for r in rows)
    # an existing prepared dir of another size is refused with one line, not overwritten
    assert loader_epoch.main(["--data", str(tmp_path / "d"), "--n", "500", "--device", "cpu"]) == 1
    assert "holds 300 train images" in capsys.readouterr().err
