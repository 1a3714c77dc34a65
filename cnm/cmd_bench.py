"""`cnm bench` (augmentation pipelines), `cnm bench train` (the train step), `cnm bench op` (the
Cut^nMix op alone): CLI wiring only.

The options of each are generated 1:1 from the fields of its config dataclass
(`bench.augment.AugmentConfig`, `bench.train.TrainBenchConfig`, `bench.op_speed.OpSpeedConfig`) by `bench.harness.config_options`,
as `cnm train`'s are from `TrainConfig`; the measurement lives in those modules, the
presentation in bench/report.py.
"""

from __future__ import annotations

import shutil
import sys

import click
from rich.console import Console

from bench import op_speed, report
from bench.augment import AugmentConfig, run_augment_bench
from bench.harness import config_options, make_config
from bench.train import TrainBenchConfig, run_train_bench

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _emit(doc: dict, *, json_path, save: bool, results_dir, plot_path, quiet: bool) -> None:
    """Print the table, then write --json, --save and --plot outputs."""
    # a wide table even when stdout is a file or a pipe (rich would assume 80 columns)
    Console(width=max(shutil.get_terminal_size((160, 24)).columns, 140)).print(report.table(doc))
    if json_path:
        path = report.write_json(doc, json_path)
        if not quiet:
            click.echo(f"wrote {path}", err=True)
    if save:
        path = report.save(doc, results_dir)
        click.echo(f"saved {path}", err=True)
    if plot_path:
        path = report.plot(doc, plot_path)
        if not quiet:
            click.echo(f"plotted {path}", err=True)
    failed = [r.get("variant", r["pipeline"]) for r in doc["results"] if r.get("failed")]
    if failed:
        click.echo(f"warning: failed while running: {', '.join(failed)} (see the reasons above)", err=True)


def _progress(quiet: bool):
    if quiet:
        return None
    return lambda msg: click.echo(msg, err=True)


def _output_options(f):
    f = click.option("--quiet", "-q", is_flag=True, help="no progress lines on stderr")(f)
    f = click.option("--isolate/--no-isolate", default=True, show_default=True,
                     help="time every row in a fresh Python process (no state carried between rows)")(f)
    f = click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
                     help="draw images/s per pipeline (log scale) to this PNG (needs cnm[plot])")(f)
    f = click.option("--results-dir", type=click.Path(file_okay=False), default=None,
                     help="where --save writes (default: bench/results of this checkout)")(f)
    f = click.option("--save", is_flag=True,
                     help="also write the JSON to bench/results/<date>-<device>-<commit>[-train].json")(f)
    f = click.option("--json", "json_path", type=click.Path(dir_okay=False),
                     help="write all figures and the environment as JSON to this file")(f)
    return f


def _run(doc_of, cfg, *, json_path, save, results_dir, plot_path, isolate, quiet) -> None:
    if plot_path:  # fail before a long run, not after it
        report.require_matplotlib()
    doc = doc_of(cfg, progress=_progress(quiet), isolate=isolate)
    _emit(doc, json_path=json_path, save=save, results_dir=results_dir, plot_path=plot_path, quiet=quiet)


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@config_options(AugmentConfig)
@_output_options
@click.pass_context
def bench(ctx, json_path, save, results_dir, plot_path, isolate, quiet, **flags):
    """Augmentation throughput: images/s with all peer views finished on the device, for every
    pipeline (cpu baseline, ffcv, dali, dali-native, resident, the op alone), side by side.

    `cnm bench train` measures the train step instead, `cnm bench op` the op's kernel alone
    (see their --help).
    """
    if ctx.invoked_subcommand is not None:
        return
    _run(run_augment_bench, make_config(AugmentConfig, flags), json_path=json_path, save=save,
         results_dir=results_dir, plot_path=plot_path, isolate=isolate, quiet=quiet)


@bench.command("train", context_settings=CONTEXT)
@config_options(TrainBenchConfig)
@_output_options
def train(json_path, save, results_dir, plot_path, isolate, quiet, **flags):
    """Train-step throughput (images/s, ms/step) of the peer ensemble: eager fp32, channels-last,
    bf16, CUDA graphs, grouped peers (those that apply on the device)."""
    _run(run_train_bench, make_config(TrainBenchConfig, flags), json_path=json_path, save=save,
         results_dir=results_dir, plot_path=plot_path, isolate=isolate, quiet=quiet)


bench.add_command(op_speed.command, "op")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(bench())
