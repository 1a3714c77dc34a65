"""TrainConfig: recipe defaults, 1:1 flag mapping, TOML precedence, loud unknown keys, resolve."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch

from pipeline.errors import CnmError
from trainer.config import (
    DEFAULTS,
    FIELDS,
    TrainConfig,
    command_line,
    flag_name,
    load_config_file,
    make_config,
    resolve,
    resolve_mix_off,
    resolve_rampup,
    resolved_dict,
)
from trainer.models import MODELS


def test_defaults_are_the_design_recipe():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.nesterov, c.weight_decay) == (300, 128, 0.1, 0.9, True, 5e-4)
    assert (c.schedule, c.temperature, c.rampup_epochs, c.ema_decay) == ("step", 3.0, "auto", "auto")
    assert (c.mix, c.alpha, c.mix_prob, c.teacher, c.fml) == ("cutnmix", 1.0, 0.5, "ema", True)
    assert c.mix_off_epoch == "auto"
    assert (c.kd_weight, c.fml_weight, c.arch, c.num_peers, c.seed) == (1.0, 1.0, "resnet32", 3, 0)
    assert (c.data, c.out, c.limit_train, c.loader, c.device) == ("data/cifar100", None, None, "auto", "auto")
    assert (c.peer_exec, c.bf16, c.channels_last, c.cuda_graphs) == ("auto",) * 4


def test_every_field_has_a_flag_and_every_flag_a_field():
    from cnm.cmd_train import train

    opts = {}
    for p in train.params:
        if p.name in ("config_file", "help"):
            continue
        opts[p.name] = p.opts + p.secondary_opts
    assert set(opts) == set(FIELDS)
    for name, flags in opts.items():
        assert flag_name(name) in flags, (name, flags)
    assert any(p.name == "config_file" and "--config" in p.opts for p in train.params)


def test_toml_then_flags_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('epochs = 7\nbatch-size = 32\nmix = "cutmix"\nfml = false\nlr = 1\n')
    vals = load_config_file(f)
    assert vals == {"epochs": 7, "batch_size": 32, "mix": "cutmix", "fml": False, "lr": 1.0}
    cfg = make_config(vals, {"epochs": 9})
    assert (cfg.epochs, cfg.batch_size, cfg.mix, cfg.fml, cfg.lr) == (9, 32, "cutmix", False, 1.0)


@pytest.mark.parametrize("text,msg", [
    ("epochz = 3\n", "unknown setting(s) epochz"),
    ("epochs = 'x'\n", "epochs must be an integer"),
    ("fml = 1\n", "fml must be true or false"),
    ("epochs = [\n", "cannot parse config file"),
    ("mix = 'cutout'\n", "--mix must be one of"),
])
def test_bad_config_files_fail_in_one_line(tmp_path, text, msg):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(CnmError) as e:
        make_config(load_config_file(f))
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,msg", [
    ({"peers": 0}, "--peers must be >= 1"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"arch": "resnet32,resnet20", "peers": 3}, "lists 2 architectures"),
    ({"mix_prob": 1.5}, "--mix-prob"),
    ({"mix_target": "teacher", "teacher": "peers"}, "--mix-target teacher needs an EMA teacher"),
    ({"mix_on_epoch": -1}, "--mix-on-epoch must be >= 0"),
    ({"mix_on_epoch": 120}, r"--mix-on-epoch 120 is not before --mix-off-epoch and --epochs \(epoch 120\)"),
    ({"mix_on_epoch": 5, "mix_off_epoch": 400, "epochs": 5}, r"is not before .* \(epoch 5\).*--mix none"),
    ({"mix_target": "teacher", "kd_weight": 0.0}, "--mix-target teacher needs an EMA teacher"),
    ({"limit_train": 0}, "--limit-train"),
])
def test_invalid_values(kw, msg):
    with pytest.raises(CnmError, match=msg):
        make_config(None, kw)


def test_resolve_on_cpu_and_archs():
    cfg = make_config(None, {"arch": "resnet20,resnet32"})
    assert cfg.archs == ["resnet20", "resnet32"] and cfg.num_peers == 2
    assert make_config(None, {"peers": 5}).archs == ["resnet32"] * 5
    if torch.cuda.is_available():
        pytest.skip("CPU resolution")
    res = resolve(make_config(None, {"arch": "resnet20"}), now=dt.datetime(2024, 1, 2, 3, 4, 5))
    assert (res.device, res.peer_exec, res.bf16, res.channels_last, res.cuda_graphs) == ("cpu", "loop", False, False, False)
    assert res.out == "runs/resnet20-p3-20240102-030405"
    with pytest.raises(CnmError, match="no CUDA device"):
        resolve(make_config(None, {"device": "cuda"}))
    with pytest.raises(CnmError, match="needs --device cuda"):
        resolve(make_config(None, {"cuda_graphs": "on"}))
    with pytest.raises(CnmError, match="unknown architecture 'resnet33'"):
        resolve(make_config(None, {"arch": "resnet33"}))
    with pytest.raises(CnmError, match="one architecture"):
        resolve(make_config(None, {"arch": "resnet20,resnet32", "peer_exec": "grouped"}))


def test_resolved_config_json_round_trips(tmp_path):
    cfg = make_config(None, {"arch": "resnet20", "epochs": 3, "out": "x"})
    d = resolved_dict(cfg, resolve(cfg))
    d["_resolved"] = {"loader": "resident"}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    again = make_config(load_config_file(p))
    assert again.epochs == 3 and again.arch == "resnet20" and again.peers == 3
    assert set(d) - {"_resolved"} == set(DEFAULTS)


def test_arch_help_lists_every_architecture():
    help_text = FIELDS["arch"].metadata["help"]
    assert all(name in help_text for name in MODELS), help_text


def test_rampup_auto_is_80_of_300_epochs_scaled():
    assert resolve_rampup("auto", 300) == pytest.approx(80.0) and resolve_rampup("auto", 30) == pytest.approx(8.0)
    assert resolve_rampup(5, 30) == 5.0 and resolve_rampup(0.0, 30) == 0.0
    cfg = make_config(None, {"arch": "resnet20", "epochs": 30, "out": "x"})
    assert cfg.rampup_epochs == "auto" and resolved_dict(cfg, resolve(cfg))["rampup_epochs"] == pytest.approx(8.0)
    assert make_config(None, {"rampup_epochs": "12.5"}).rampup_epochs == 12.5      # a flag's text
    for bad, msg in (("soon", "--rampup-epochs must be a number or auto, got 'soon'"),
                     ("-1", "--rampup-epochs must be >= 0 or auto, got -1.0"),
                     ("nan", "--rampup-epochs must be a finite number")):
        with pytest.raises(CnmError, match=msg):
            make_config(None, {"rampup_epochs": bad})
    for kw, msg in (({"eval_every": 0}, "--eval-every must be >= 1"), ({"log_every": 0}, "--log-every must be >= 1"),
                    ({"log": "wandb"}, "--log must be one of none, tensorboard")):
        with pytest.raises(CnmError, match=msg):
            make_config(None, kw)


def test_mix_off_epoch_auto_is_a_fraction_of_the_epochs_rounded_up():
    assert [resolve_mix_off("auto", e) for e in (300, 640, 160, 10, 3, 1)] == [120, 256, 64, 4, 2, 1]
    assert resolve_mix_off(7, 30) == 7 and resolve_mix_off(0.0, 30) == 0 and resolve_mix_off(99, 30) == 99
    cfg = make_config(None, {"arch": "resnet20", "epochs": 30, "out": "x"})
    assert resolve(cfg).mix_off_epoch == 12 and resolved_dict(cfg, resolve(cfg))["mix_off_epoch"] == 12
    assert make_config(None, {"mix_off_epoch": "12"}).mix_off_epoch == 12
    for bad, msg in (("never", "--mix-off-epoch must be a number or auto, got 'never'"),
                     ("-1", "--mix-off-epoch must be a whole number >= 0 or auto, got -1.0"),
                     ("2.5", "--mix-off-epoch must be a whole number >= 0 or auto, got 2.5")):
        with pytest.raises(CnmError, match=msg):
            make_config(None, {"mix_off_epoch": bad})


def test_a_runs_config_json_drops_its_record_out_and_resume(tmp_path):
    cfg = make_config(None, {"arch": "resnet20", "epochs": 3, "out": "runs/old", "eval_every": 2})
    d = resolved_dict(cfg, resolve(cfg))
    d.update(_resolved={"loader": "resident"}, _record={"command": "cnm train"}, resume=True)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    vals = load_config_file(p)
    assert "out" not in vals and "resume" not in vals and vals["eval_every"] == 2
    assert vals["rampup_epochs"] == pytest.approx(0.8)          # the resolved value, repeated as is
    toml = tmp_path / "c.toml"                                  # a TOML file's out is a setting
    toml.write_text('out = "runs/x"\nrampup-epochs = "auto"\n')
    assert load_config_file(toml) == {"out": "runs/x", "rampup_epochs": "auto"}
    toml.write_text("rampup_epochs = true\n")
    with pytest.raises(CnmError, match="--rampup-epochs must be a number or auto, got True"):
        load_config_file(toml)


def test_command_line_of_the_flags_given():
    given = {"quiet": True, "fml": False, "epochs": 2, "data": "my data", "resume": False, "nesterov": True}
    assert command_line("c.toml", given) == ("cnm train --config c.toml --data 'my data' --epochs 2 --nesterov "
                                             "--no-fml --quiet")
    assert command_line(None, {}) == "cnm train"
