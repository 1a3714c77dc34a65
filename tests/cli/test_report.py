"""`cnm report` on two real short runs (made with `cnm prepare` and `cnm train`): the table, the
JSON and CSV agree with the runs' metrics.jsonl; runs of different lengths and a run that is still
going (torn last line) are read; the PNG opens; a non-run path is one `error:` line."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys

import pytest

from cnm.cli import main
from pipeline import backends
from tests.cli.clirun import run_main
from trainer.checkpoint import read_jsonl

TRAIN = ["train", "--arch", "resnet20", "--peers", "2", "--batch-size", "16", "--limit-train", "32",
         "--device", "cpu", "--loader", "resident", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs: cutnmix + EMA teacher for 2 epochs, cutmix without a teacher for 3."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    for argv in (["prepare", "--dataset", "synthetic", "--num-classes", "4", "--train-size", "64",
                  "--test-size", "32", "--no-beton", "--out", str(data)],
                 [*TRAIN, "--data", str(data), "--epochs", "2", "--out", str(root / "ema")],
                 [*TRAIN, "--data", str(data), "--epochs", "3", "--mix", "cutmix", "--teacher", "none",
                  "--out", str(root / "cutmix")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
    return {"ema": root / "ema", "cutmix": root / "cutmix"}


def expected_order(paths):
    """Run names sorted as the report must sort them (final ensemble accuracy, then name)."""
    final = {p.name: read_jsonl(p / "metrics.jsonl")[-1]["ensemble_acc"] for p in paths}
    return sorted(final, key=lambda n: (-final[n], n))


def test_json_matches_the_metrics(runs, capsys):
    code, out, err = run_main(["report", str(runs["ema"]), str(runs["cutmix"]), "--json"], capsys)
    assert code == 0, err
    recs = json.loads(out)["runs"]
    assert [r["run"] for r in recs] == expected_order(runs.values())
    by = {r["run"]: r for r in recs}
    for name, path in runs.items():
        rows = read_jsonl(path / "metrics.jsonl")
        rec = by[name]
        assert rec["epochs_done"] == rec["epochs_total"] == len(rows)
        # --rampup-epochs and --mix-off-epoch auto resolved to 80/300 and 2/5 (rounded up) of each
        # run's epochs: they differ too
        assert rec["settings"] == ({"mix": "cutnmix", "teacher": "ema", "rampup_epochs": pytest.approx(80 / 300 * 2),
                                    "mix_off_epoch": 1}
                                   if name == "ema" else
                                   {"mix": "cutmix", "teacher": "none", "rampup_epochs": pytest.approx(80 / 300 * 3),
                                    "mix_off_epoch": 2})
        assert rec["wall_s"] == pytest.approx(sum(r["epoch_s"] + r["eval_s"] for r in rows))
        ens = [r["ensemble_acc"] for r in rows]
        assert rec["ensemble"] == {"final": ens[-1], "best": max(ens), "best_epoch": ens.index(max(ens)) + 1}
        for k in range(2):
            accs = [r["test_acc"][k] for r in rows]
            assert rec["peers"][k] == {"final": accs[-1], "best": max(accs), "best_epoch": accs.index(max(accs)) + 1}
        if name == "ema":
            t = [r["teacher_ensemble_acc"] for r in rows]
            assert rec["teacher_ensemble"]["final"] == t[-1] and rec["teacher_ensemble"]["best"] == max(t)
        else:
            assert rec["teacher_ensemble"] == {"final": None, "best": None, "best_epoch": None}


def test_table_and_csv(runs, capsys):
    code, out, err = run_main(["report", str(runs["cutmix"]), str(runs["ema"])], capsys)
    assert code == 0 and err == ""
    lines = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]]
             for ln in out.splitlines() if ln.count("│") >= 3}
    order = expected_order(runs.values())
    header = next(ln for ln in out.splitlines() if "┃" in ln and order[0] in ln)
    assert header.index(order[0]) < header.index(order[1])
    cols = {name: i for i, name in enumerate(order)}
    assert lines["--mix"][cols["ema"]] == "cutnmix" and lines["--mix"][cols["cutmix"]] == "cutmix"
    assert lines["--teacher"][cols["ema"]] == "ema" and lines["--teacher"][cols["cutmix"]] == "none"
    assert "--arch" not in lines and "--peers" not in lines          # the same in both runs
    assert lines["epochs"][cols["ema"]] == "2/2" and lines["epochs"][cols["cutmix"]] == "3/3"
    assert lines["EMA teacher ensemble final"][cols["cutmix"]] == "-"
    for name, path in runs.items():
        rows = read_jsonl(path / "metrics.jsonl")
        assert lines["peer ensemble final"][cols[name]] == f"{rows[-1]['ensemble_acc']:.2f}"
        assert lines["peer 2 final"][cols[name]] == f"{rows[-1]['test_acc'][1]:.2f}"
    code, out, _ = run_main(["report", str(runs["cutmix"]), str(runs["ema"]), "--csv"], capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["run"] for r in table] == order
    ema = next(r for r in table if r["run"] == "ema")
    rows = read_jsonl(runs["ema"] / "metrics.jsonl")
    assert ema["mix"] == "cutnmix" and ema["epochs_done"] == "2"
    assert float(ema["teacher_ensemble_final"]) == rows[-1]["teacher_ensemble_acc"]
    assert float(ema["peer1_best"]) == max(r["test_acc"][0] for r in rows)


def test_a_run_still_going(runs, tmp_path, capsys):
    """Half of its epochs written, the last line torn mid-write (as a kill during append leaves it)."""
    going = tmp_path / "going"
    shutil.copytree(runs["cutmix"], going)
    text = (going / "metrics.jsonl").read_text().splitlines(keepends=True)
    (going / "metrics.jsonl").write_text(text[0] + text[1][: len(text[1]) // 2])
    code, out, err = run_main(["report", str(going), str(runs["ema"]), "--json"], capsys)
    assert code == 0, err
    rec = next(r for r in json.loads(out)["runs"] if r["run"] == "going")
    first = json.loads(text[0])
    assert rec["epochs_done"] == 1 and rec["epochs_total"] == 3
    assert rec["ensemble"]["final"] == first["ensemble_acc"]
    (going / "metrics.jsonl").unlink()                              # started, no epoch finished yet
    code, out, err = run_main(["report", str(going)], capsys)
    assert code == 0 and "0/3" in out, err


def test_epochs_without_evaluation_are_skipped(runs, tmp_path, capsys):
    """Rows whose test accuracies are null (an epoch not evaluated) count as done, not measured."""
    sparse = tmp_path / "sparse"
    shutil.copytree(runs["cutmix"], sparse)
    rows = read_jsonl(sparse / "metrics.jsonl")
    rows[1].update(test_acc=None, ensemble_acc=None)
    (sparse / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_main(["report", str(sparse), "--json"], capsys)
    assert code == 0, err
    (rec,) = json.loads(out)["runs"]
    measured = [r["ensemble_acc"] for r in rows if r["ensemble_acc"] is not None]
    assert rec["epochs_done"] == 3 and rec["ensemble"]["final"] == rows[2]["ensemble_acc"]
    assert rec["ensemble"]["best"] == max(measured) and rec["ensemble"]["best_epoch"] != 2
    assert [p["final"] for p in rec["peers"]] == rows[2]["test_acc"]


def test_plot_is_a_png_that_opens(runs, tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    png = tmp_path / "curves.png"
    code, _, err = run_main(["report", str(runs["ema"]), str(runs["cutmix"]), "--plot", str(png)], capsys)
    assert code == 0 and f"plotted {png}" in err
    pixels = image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 0.01                                      # something was drawn


def test_plot_without_matplotlib_is_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    backends.reset_cache()
    try:
        code, out, err = run_main(["report", str(runs["ema"]), "--plot", str(tmp_path / "x.png")], capsys)
    finally:
        backends.reset_cache()
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: matplotlib is not installed") and "cnm[plot]" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("what,msg", [("missing", ": no such run directory"), ("data", ": not a cnm run directory"),
                                      ("bad", "/config.json: cannot read the run's settings")])
def test_not_a_run_is_one_line(runs, tmp_path, capsys, what, msg):
    path = {"missing": tmp_path / "nope", "data": runs["ema"].parent / "data", "bad": tmp_path / "bad"}[what]
    if what == "bad":
        path.mkdir()
        (path / "config.json").write_text("{not json")
    code, out, err = run_main(["report", str(runs["ema"]), str(path)], capsys)
    assert code == 1 and out == "" and err.startswith(f"error: {path}{msg}")
    assert err.count("\n") == 1 and "Traceback" not in err
