"""`cnm train`: one click option per `TrainConfig` field (generated), plus `--config FILE`.

Wiring only: the options are built from `trainer.config.FIELDS` (so flags and fields cannot
drift apart) and the run is `trainer.loop.train`.
"""

from __future__ import annotations

import click

from pipeline.errors import CnmError
from trainer.config import DEFAULTS, FIELDS, field_type, flag_name


class Integer(click.ParamType):
    """An integer option whose bad value (`--seed 1e20`, `--epochs 2.5`) is one `error:` line
    (a CnmError, exit 1) like every other bad input, not click's usage block (exit 2)."""

    name = "integer"

    def __init__(self, flag: str):
        self.flag = flag

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip(), 10)
        except ValueError:
            raise CnmError(f"{self.flag} must be an integer, got {value!r}") from None


ONE_WAY = ("resume", "quiet", "allow_new_data")   # flags without a --no- form


def _default_text(name: str) -> str:
    if name == "peers":
        return "3, or the length of an --arch list"
    if name == "out":
        return "runs/<arch>-p<P>-<timestamp>"
    v = DEFAULTS[name]
    if v is None:
        return "all"
    if name in ONE_WAY:
        return "off"
    if isinstance(v, bool):
        return flag_name(name)[2:] if v else "no-" + flag_name(name)[2:]
    return str(v)


def _options(func):
    for name in reversed(list(FIELDS)):
        meta = FIELDS[name].metadata
        typ = field_type(name)
        help_text = f"{meta['help']} [default: {_default_text(name)}]"
        if typ is bool:
            if name in ONE_WAY:
                opt = click.option(flag_name(name), name, is_flag=True, default=None, help=help_text)
            else:
                flag = flag_name(name)[2:]
                opt = click.option(f"--{flag}/--no-{flag}", name, default=None, help=help_text)
        else:
            ctype = click.Choice(meta["choices"]) if meta.get("choices") else {
                int: Integer(flag_name(name)), float: float, str: str}[typ]
            metavar = None if meta.get("choices") else meta.get("metavar") or {"data": "DIR", "out": "RUN"}.get(name)
            opt = click.option(flag_name(name), name, type=ctype, default=None, help=help_text,
                               metavar=metavar)
        func = opt(func)
    return func


@click.command("train", context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings (field names as keys), or a run's config.json; "
                   "flags given here override it")
@_options
def train(config_file, **flags):
    """Train P peers with Cut^nMix online distillation (defaults: docs/design.md#the-recipe)."""
    from trainer.config import command_line, load_config_file, make_config
    from trainer.distributed import launched
    from trainer.loop import train as run_training

    file_values = load_config_file(config_file) if config_file else {}
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = make_config(file_values, given)
    # under torchrun: join the process group (NCCL on CUDA, gloo on the CPU); otherwise one process
    with launched(cfg.device, cfg.dist_timeout) as comm:
        run_training(cfg, explicit=set(file_values) | set(given), comm=comm,
                     command=command_line(config_file, given))
