"""The `cnm` command group. Each subcommand lives in its own module and is imported on use,
so `cnm info` works where torch back-ends are broken and `--help` stays fast.

Every `CnmError` becomes one line on stderr and exit status 1; Ctrl-C becomes exit 130. During
`cnm train`'s epochs SIGTERM and Ctrl-C are a clean stop (trainer/signals.py): the resume command,
then exit 143 / 130 (the `SystemExit` passes through here unchanged).
"""

from __future__ import annotations

import importlib
import sys

import click

from cnm import __version__
from pipeline.errors import CnmError

# name -> "module:attribute" of a click command
COMMANDS = {
    "prepare": "cnm.cmd_prepare:prepare",
    "info": "cnm.cmd_info:info",
    "train": "cnm.cmd_train:train",
    "eval": "cnm.cmd_eval:eval_",
    "report": "cnm.cmd_report:report",
    "bench": "cnm.cmd_bench:bench",
    "check": "cnm.cmd_check:check",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cnm")
def cli():
    """Cut^nMix online knowledge distillation on CIFAR (see README.md)."""


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="cnm", standalone_mode=False)
    except CnmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk or a permission fault outside the guarded writers
        click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
        sys.exit(1)
    sys.exit(0)
