"""`cnm report`: CLI wiring for `trainer.report` (compare runs, draw their curves)."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from pipeline.errors import CnmError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw test accuracy and training loss against epoch for every run (needs cnm[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of a table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the comparison as CSV (one line per run).")
def report(runs, plot_path, as_json, as_csv):
    """Compare run directories side by side: the settings that differ, epochs done, wall time, and
    the final and best test accuracy of the peer ensemble, the EMA teacher ensemble and every peer,
    sorted by final peer-ensemble accuracy. Works on runs that are still going.

    \b
    cnm report runs/mix-* --plot curves.png
    cnm report runs/a runs/b --csv > ablation.csv
    """
    from trainer import report as rep  # lazy: it loads torch, and `cnm --help` imports this module

    if as_json and as_csv:
        raise CnmError("--json and --csv: choose one")
    loaded = rep.load_runs(runs)
    if plot_path:
        rep.require_plotting()
    if as_json:
        click.echo(rep.to_json(loaded))
    elif as_csv:
        click.echo(rep.to_csv(loaded), nl=False)
    else:
        # piped output keeps whole lines (no wrapping at 80 columns)
        Console(width=None if sys.stdout.isatty() else 10_000).print(rep.render_table(loaded))
    if plot_path:
        click.echo(f"plotted {rep.plot(loaded, plot_path)}", err=True)
