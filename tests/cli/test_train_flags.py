"""`cnm train` numeric flags: a non-finite number or a seed outside [0, 2**63) is one `error:`
line and exit status 1, before anything is read or written (no OverflowError/struct.error
traceback from the seed hashing or torch.manual_seed)."""

from __future__ import annotations

import pytest

from cnm.cli import main
from pipeline.errors import CnmError
from trainer.config import FIELDS, field_type, flag_name, make_config


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("argv,msg", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--kd-weight", "nan"], "--kd-weight must be a finite number, got nan"),
    (["--fml-weight", "inf"], "--fml-weight must be a finite number, got inf"),
    (["--seed", str(10 ** 20)], f"--seed must be an integer in [0, 2**63), got {10 ** 20}"),
    (["--seed", str(2 ** 64 - 1)], f"--seed must be an integer in [0, 2**63), got {2 ** 64 - 1}"),
    (["--seed", str(2 ** 63)], f"--seed must be an integer in [0, 2**63), got {2 ** 63}"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
])
def test_bad_numbers_fail_in_one_line(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["train", "--out", "r", *argv], capsys)
    assert (code, out, err) == (1, "", f"error: {msg}\n")
    assert list(tmp_path.iterdir()) == []


def test_every_float_flag_refuses_non_finite_values():
    floats = [n for n in FIELDS if field_type(n) is float]
    assert {"lr", "weight_decay", "temperature", "kd_weight", "fml_weight"} <= set(floats)
    for name in floats:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(CnmError, match=f"^{flag_name(name)} must be a finite number"):
                make_config(overrides={name: bad})


def test_seed_bounds_and_config_files(tmp_path, capsys):
    assert make_config(overrides={"seed": 2 ** 63 - 1}).seed == 2 ** 63 - 1
    assert make_config(overrides={"seed": 0}).seed == 0
    toml = tmp_path / "c.toml"
    toml.write_text(f"lr = nan\nseed = {2 ** 63}\n")
    code, _out, err = run_main(["train", "--config", str(toml)], capsys)
    assert (code, err) == (1, "error: --lr must be a finite number, got nan\n")
    toml.write_text("seed = 18446744073709551615\n")
    code, _out, err = run_main(["train", "--config", str(toml)], capsys)
    assert (code, err) == (1, "error: --seed must be an integer in [0, 2**63), got 18446744073709551615\n")


def test_a_seed_in_float_notation_is_one_error_line(capsys):
    code, _out, err = run_main(["train", "--seed", "1e20"], capsys)
    assert code == 1 and err == "error: --seed must be an integer, got '1e20'\n"
