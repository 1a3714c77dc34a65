"""`cnm train` on the command line: help lists every flag, --config precedence, and every bad
input is one line on stderr with exit status 1 (no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.manifest import write_dataset
from tests.cli.clirun import run_main
from trainer.config import FIELDS, flag_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("d") / "data"
    imgs = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    write_dataset(out, {"train": (imgs, np.arange(64) % 4), "test": (imgs[:16], np.arange(16) % 4)},
                  dataset="fake", class_names=list("abcd"), beton=False)
    return out


def test_help_lists_every_flag(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    for name in FIELDS:
        assert flag_name(name) in out, name
    assert "--config" in out and "[default: 300]" in out


@pytest.mark.parametrize("argv,msg", [
    (["--arch", "resnet33"], "unknown architecture 'resnet33'; choose one of: resnet20"),
    (["--peers", "0"], "--peers must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--resume"], "--resume needs --out"),
    (["--arch", "resnet20,vgg16", "--peer-exec", "grouped"], "one architecture"),
])
def test_bad_flags_fail_in_one_line(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _out, err = run_main(["train", *argv], capsys)
    assert code == 1 and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_data_and_resume(capsys, tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--data", "nowhere"], "cnm prepare --dataset cifar100 --download --out nowhere"),
        ([], "data/cifar100: data directory does not exist"),                      # the default
        (["--data", str(tmp_path)], "not a `cnm prepare` output directory"),       # wrong format
        (["--data", str(data), "--out", str(tmp_path / "r"), "--resume"], "no last.pt to resume from"),
        (["--data", str(data), "--limit-train", "8", "--loader", "resident", "--arch", "resnet20",
          "--mix", "cutmix", "--alpha", "-1"], "--alpha must be > 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--data", str(data), "--device", "cuda"], "--device cuda: no CUDA device"))
    for argv, msg in cases:
        code, _out, err = run_main(["train", *argv], capsys)
        assert code == 1 and msg in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "runs").exists()


def test_unknown_config_key_and_precedence(capsys, tmp_path, data):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 2\nlearning_rate = 0.1\n")
    code, _, err = run_main(["train", "--config", str(bad)], capsys)
    assert code == 1 and "unknown setting(s) learning_rate" in err and err.count("\n") == 1
    good = tmp_path / "good.toml"
    good.write_text(f'data = "{data}"\narch = "resnet20"\npeers = 2\nepochs = 5\nbatch-size = 16\n'
                    f'limit-train = 16\nquiet = true\ndevice = "cpu"\nteacher = "none"\n')
    run = tmp_path / "run"
    code, out, err = run_main(["train", "--config", str(good), "--epochs", "1", "--out", str(run)], capsys)
    assert code == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["batch_size"] == 16 and cfg["arch"] == "resnet20" and cfg["peers"] == 2
    assert "epoch 1/1" in out


def test_subprocess_bad_arch_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "cnm", "train", "--arch", "nope"], check=False, cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.startswith("error: unknown architecture 'nope'") and p.stderr.count("\n") == 1
