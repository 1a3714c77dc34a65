"""bench.ablation: every row on a tiny budget (in process and as subprocesses), the metrics it
reads, mean/spread, a failing run marked failed, bad arguments."""

from __future__ import annotations

import json

import pytest

from bench import ablation
from pipeline.data.prepare import prepare
from pipeline.errors import CnmError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("abl") / "syn"
    prepare("synthetic", out, num_classes=4, train_size=16, test_size=8, seed=0, difficulty=0.5, object_scale=1.5,
            beton=False)
    return out


def _args(data, out, *more):
    return ["--data", str(data), "--out", str(out), "--epochs", "1", "--seeds", "1", "--batch-size", "8",
            "--lr", "0.01", *more]


def test_every_row_on_a_tiny_budget(data, tmp_path, capsys):
    code = ablation.main(_args(data, tmp_path / "runs", "--in-process", "--save", str(tmp_path / "t.md")))
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + len(ablation.ROWS)                       # header + one line per row
    for (name, label, flags), line in zip(ablation.ROWS, lines[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == label and cells[2] == "1/1" and len(cells) == 12
        ema = "--teacher" not in flags                                 # rows with an EMA teacher
        assert (cells[5] != "-" and cells[6] != "-") == ema, line     # teacher-ens final, best
        assert cells[7] == "-", line                    # one epoch: the rows mix throughout
        assert all(c != "-" for c in cells[3:5] + cells[8:11]), line   # 2 peers: a disagreement
    saved = (tmp_path / "t.md").read_text()
    assert "- command: `python -m bench.ablation --data" in saved and "- commit:" in saved
    assert "wall time" in saved and saved.endswith(out[out.index("| row"):])
    assert (f"recreate with `cnm prepare --dataset synthetic --num-classes 4 --train-size 16 --test-size 8 "
            f"--seed 0 --difficulty 0.5 --object-scale 1.5 --out {data}`") in saved
    assert ("- settings: 2 x resnet20, 1 epochs, batch 8, lr 0.01 cosine, ramp-up 0.27 epochs, "
            "mixing off from epoch 1 (auto)") in saved
    # every run read its own metrics: the full framework has a teacher, DML does not
    full = json.loads((tmp_path / "runs" / "full-s0" / "config.json").read_text())
    assert full["teacher"] == "ema" and full["mix"] == "cutnmix" and full["fml"] is True
    assert full["rampup_epochs"] == round(1 * 80 / 300, 2)
    steps = full["_resolved"]["steps_per_epoch"]                       # 16 images / batch 8 = 2
    assert full["_resolved"]["ema_decay"] == full["ema_decay"] == pytest.approx(1 - 1 / (2.56 * steps))


def test_subprocess_runs_json_and_reuse(data, tmp_path, capsys):
    args = _args(data, tmp_path / "runs", "--rows", "independent,full", "--jobs", "2", "--json")
    assert ablation.main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["row"]: r for r in doc["rows"]}
    assert list(rows) == ["independent", "full"]
    assert rows["independent"]["teacher_final"] is None and rows["full"]["teacher_final"] is not None
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "full-s0" / "metrics.jsonl").read_text().splitlines()]
    assert rows["full"]["ens_final"]["values"] == [metrics[-1]["ensemble_acc"]]
    assert (tmp_path / "runs" / "full-s0" / "train.log").read_text().startswith("run ")
    # --reuse reads the finished runs again instead of training
    assert ablation.main([*args, "--reuse"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["rows"][1]["ens_final"] == rows["full"]["ens_final"]
    assert again["rows"][1]["seconds_per_run"] == 0.0
    # --collect tabulates what finished and marks the rest, training nothing
    assert ablation.main([*args, "--collect", "--rows", "independent,full,dml"]) == 1
    doc = json.loads(capsys.readouterr().out)
    dml = doc["rows"][2]
    assert dml["runs"] == 0 and dml["not_run"] == 1 and not dml["failed"] and "not run" in dml["errors"][0]
    assert not (tmp_path / "runs" / "dml-s0").exists()


def test_reuse_retrains_a_run_made_with_other_settings(data, tmp_path, capsys):
    """--reuse reuses a finished run only when its config.json has the settings the row would
    train with now (auto values resolved); --collect tabulates it anyway and says what differs."""
    runs = tmp_path / "runs"
    args = _args(data, runs, "--in-process", "--rows", "independent,full", "--json",
                 "--extra=--eval-every=1 --weight-decay=0.0005")
    assert ablation.main(args) == 0
    capsys.readouterr()
    full, independent = runs / "full-s0", runs / "independent-s0"
    cfg = json.loads((full / "config.json").read_text())
    assert ablation.settings_differ(full, ablation.train_args(ablation.parse_args(args), (), 0, full)) == []

    def edit(run, **changes):
        c = json.loads((run / "config.json").read_text())
        for k, v in changes.items():
            c.pop(k) if v is None else c.__setitem__(k, v)
        (run / "config.json").write_text(json.dumps(c))

    edit(full, lr=0.02, mix_off_epoch=None)            # another lr; a run older than --mix-off-epoch
    edit(full, mix_target=None, mix_on_epoch=None)     # older than these: area, 0 (the same run)
    edit(independent, mix_off_epoch=7, mix_prob=0.9, mix_on_epoch=3)   # without mixing these change nothing
    stamp = (independent / "metrics.jsonl").stat().st_mtime_ns
    assert ablation.main([*args, "--collect"]) == 0
    err = capsys.readouterr().err
    assert f"note: {full} was trained with other settings: lr: run 0.02, now 0.01; mix_off_epoch: not recorded" in err
    assert "independent-s0" not in err
    assert json.loads((full / "config.json").read_text())["lr"] == 0.02       # --collect trains nothing

    assert ablation.main([*args, "--reuse"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"][0]["seconds_per_run"] == 0.0 and doc["rows"][1]["seconds_per_run"] > 0
    assert (independent / "metrics.jsonl").stat().st_mtime_ns == stamp        # reused
    again = json.loads((full / "config.json").read_text())                     # trained again
    assert again.pop("_record")["date"] and again == {k: v for k, v in cfg.items() if k != "_record"}


def test_teacher_at_the_epoch_where_mixing_stops(data, tmp_path, capsys):
    """The teacher-ensemble column is read after the epoch where the budget's mixing stops (auto:
    2/5 of the epochs, rounded up; or --mix-off-epoch in --extra), in every row that has a teacher."""
    runs = tmp_path / "runs"
    args = _args(data, runs, "--in-process", "--rows", "independent,full", "--epochs", "3", "--json")
    assert ablation.main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mix_off_epoch"] == 2                                   # ceil(2/5 * 3)
    rows = [json.loads(x) for x in (runs / "full-s0" / "metrics.jsonl").read_text().splitlines()]
    at = {r["row"]: r["teacher_at_mix_off"] for r in doc["rows"]}
    assert at["independent"] is None and at["full"]["values"] == [rows[1]["teacher_ensemble_acc"]]
    assert ablation.main([*args[:-1], "--collect", "--extra=--mix-off-epoch=1"]) == 0
    table = capsys.readouterr().out
    assert "| teacher-ens at epoch 1 (mix-off) |" in table
    full = next(ln for ln in table.splitlines() if ln.startswith("| full framework"))
    assert f" {rows[0]['teacher_ensemble_acc']:.2f} " in full.split("|")[8]


def test_settings_from_argv_reads_flag_equals_value():
    assert ablation.settings_from_argv(["--eval-every=8", "--no-fml", "--mix", "none", "--lr=0.5"]) == {
        "eval_every": 8, "fml": False, "mix": "none", "lr": 0.5}


def test_a_failing_run_marks_its_row_failed(data, tmp_path, capsys, monkeypatch):
    real = ablation._run_in_process

    def flaky(argv, log, threads, teacher_buffers=None):
        if "peers" in argv:                     # the DML row (`--teacher peers`) crashes
            raise_in = argv.index("peers")
            return f"RuntimeError: injected failure at argument {raise_in}"
        return real(argv, log, threads, teacher_buffers)

    monkeypatch.setattr(ablation, "_run_in_process", flaky)
    code = ablation.main(_args(data, tmp_path / "runs", "--in-process", "--rows", "independent,dml"))
    out = capsys.readouterr().out
    assert code == 1                            # a row with no finished run
    assert "| DML (peers teacher, FML) | `--teacher peers --mix none` | 0/1 **failed** |" in out
    assert "- dml seed 0: RuntimeError: injected failure" in out
    assert "| independent peers | `--mix none --teacher none --no-fml` | 1/1 |" in out


def test_a_run_directory_in_use_is_left_alone(data, tmp_path, capsys):
    """A run another process is still training (its lock held) is neither cleared nor retrained:
    its files stay byte for byte and the row reports the lock's one line."""
    from trainer.rundir import RunLock

    run = tmp_path / "runs" / "independent-s0"
    run.mkdir(parents=True)
    files = {n: f"{n} of the running process\n" for n in ("metrics.jsonl", "config.json", "train.log")}
    for n, text in files.items():
        (run / n).write_text(text)
    with RunLock(run):
        code = ablation.main(_args(data, tmp_path / "runs", "--in-process", "--rows", "independent"))
    out = capsys.readouterr().out
    assert code != 0 and "in use by another cnm process" in out, out
    assert {n: (run / n).read_text() for n in files} == files


def test_teacher_buffers_are_set_for_the_run_only(data, tmp_path, capsys, monkeypatch):
    from trainer import teacher as teacher_mod

    seen = []
    real_init = teacher_mod.EMATeacher.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen.append(self.buffer_mode)

    monkeypatch.setattr(teacher_mod.EMATeacher, "__init__", spy)
    assert ablation.main(_args(data, tmp_path, "--in-process", "--rows", "full", "--teacher-buffers",
                               "copy")) == 0
    assert seen == ["copy"] and teacher_mod.EMATeacher.default_buffers == "ema"
    capsys.readouterr()


def test_summary_and_spread():
    rows = [{"epoch": 1, "ensemble_acc": 50.0, "teacher_ensemble_acc": 40.0, "test_acc": [45.0, 47.0],
             "disagreement": 30.0},
            {"epoch": 2, "ensemble_acc": 70.0, "teacher_ensemble_acc": 72.0, "test_acc": [60.0, 62.0],
             "disagreement": 20.0},
            {"epoch": 3, "ensemble_acc": 65.0, "teacher_ensemble_acc": 71.0, "test_acc": [64.0, 66.0],
             "disagreement": 12.5}]
    assert ablation.summarize_metrics(rows) == {"ens_final": 65.0, "ens_best": 70.0, "teacher_final": 71.0,
                                                "teacher_best": 72.0, "teacher_at_mix_off": None,
                                                "peer_final": 65.0, "disagreement": 12.5}
    assert ablation.summarize_metrics(rows, mix_off=2)["teacher_at_mix_off"] == 72.0
    old = [{k: v for k, v in r.items() if k != "disagreement"} for r in rows]   # written before it existed
    assert ablation.summarize_metrics(old)["disagreement"] is None
    skipped = {"epoch": 2, "ensemble_acc": None, "teacher_ensemble_acc": None, "test_acc": [None, None]}
    assert ablation.summarize_metrics([rows[0], skipped, rows[2]])["ens_best"] == 65.0  # --eval-every 2
    with pytest.raises(CnmError, match="epoch 2 was not evaluated"):
        ablation.summarize_metrics([rows[0], skipped])
    assert ablation.mean_spread([1.0, 2.0, None, 3.0]) == (2.0, 1.0)
    assert ablation.mean_spread([4.0]) == (4.0, 0.0) and ablation.mean_spread([None]) is None


def test_delta_pairs_the_seeds_both_rows_have():
    """A row that finished fewer seeds is compared with the same seeds of independent peers."""
    def run(row, seed, acc):
        return ablation.RunResult(row, seed, f"runs/{row}-s{seed}", True, 0.0,
                                  {"ens_final": acc, "ens_best": acc, "teacher_final": None,
                                   "teacher_best": None, "peer_final": acc})
    results = [run("independent", 0, 88.5), run("independent", 1, 84.5), run("independent", 2, 84.5),
               run("full", 0, 93.0), run("full", 1, 90.5), run("full", 2, 93.5),
               run("cutnmix", 0, 81.5), run("dml", 1, 90.0), run("dml", 2, 88.0),
               ablation.RunResult("dml", 0, "runs/dml-s0", False, 0.0, error="not run (missing)")]
    table = ablation.aggregate(results, ["independent", "full", "cutnmix", "dml"], 3)
    cells = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in ablation.markdown(table).splitlines()
             if ln.startswith("| ") and "---" not in ln}
    assert cells["full framework (defaults)"][10] == "+6.50"         # all seeds: the difference of means
    assert cells["Cut^nMix alone"][10] == "-7.00 (seed 0)"           # not 81.5 - 85.83
    assert cells["DML (peers teacher, FML)"][10] == "+4.50 (seeds 1, 2)"
    assert cells["full framework (defaults)"][9] == "-"              # no disagreement recorded
    assert table[2]["seed_list"] == [0]
    assert cells["Cut^nMix alone"][3] == "81.50"                     # one run: no spread
    assert cells["full framework (defaults)"][3] == "92.33 ± 1.61"


@pytest.mark.parametrize("more,words", [
    (["--rows", "full,nope"], "unknown row(s) nope"),
    (["--seeds", "0"], "must be >= 1"),
    (["--teacher-buffers", "copy"], "needs --in-process"),
])
def test_bad_arguments(data, tmp_path, capsys, more, words):
    assert ablation.main(_args(data, tmp_path, *more)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
