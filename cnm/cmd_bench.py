"""`cnm bench` (augmentation pipelines) and `cnm bench train` (the train step): CLI wiring only.

The measurement lives in bench/augment.py and bench/train.py, the presentation in
bench/report.py.
"""

from __future__ import annotations

import sys

import click

from pipeline.errors import CnmError

PIPELINE_CHOICES = ("cpu", "ffcv", "dali", "dali-native", "resident", "op")
VARIANT_CHOICES = ("eager-fp32", "channels-last", "channels-last+bf16", "+cuda-graphs", "+grouped")


def _comma_list(value: str, choices: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise CnmError(f"{flag} is empty; choose from {','.join(choices)}")
    bad = [v for v in items if v not in choices]
    if bad:
        raise CnmError(f"{flag}: unknown {', '.join(bad)}; choose from {','.join(choices)}")
    if len(set(items)) != len(items):
        raise CnmError(f"{flag}: {value} names an entry twice")
    return items


def _emit(doc: dict, *, json_path, save: bool, results_dir, plot_path, quiet: bool) -> None:
    """Print the table, then write --json, --save and --plot outputs."""
    import shutil

    from rich.console import Console

    from bench import report

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


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default="synthetic", show_default=True,
              help="a `cnm prepare` directory, or `synthetic` for a temporary random CIFAR-shaped set")
@click.option("--synthetic-images", default=50000, show_default=True, type=int,
              help="train images in the synthetic set")
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cuda:N | cpu")
@click.option("--peers", default=3, show_default=True, type=int, help="views per sample (P)")
@click.option("--batch-size", default=512, show_default=True, type=int)
@click.option("--mode", default="cutnmix", show_default=True,
              type=click.Choice(["cutnmix", "cutmix", "mixup", "none"]))
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
              help="dtype of the views (auto: bf16 on CUDA, fp32 on CPU)")
@click.option("--pipelines", default=",".join(PIPELINE_CHOICES), show_default=True,
              help="comma list of pipelines to time, in order")
@click.option("--repeats", default=5, show_default=True, type=int, help="timed regions per pipeline")
@click.option("--batches", default=None, type=int, help="batches per timed region")
@click.option("--images", default=None, type=int, help="images per timed region (whole batches)")
@click.option("--seconds", default=1.0, show_default=True, type=float,
              help="without --batches/--images: size each timed region to last about this long")
@click.option("--warmup", default=3, show_default=True, type=int, help="untimed batches first")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--op-batch-size", default=None, type=int,
              help="batch of the `op` row (default: --batch-size; use e.g. 65536 for its bandwidth)")
@click.option("--peak-gbps", default=None, type=float,
              help="device peak memory bandwidth in GB/s (default: datasheet value by device name)")
@_output_options
@click.pass_context
def bench(ctx, data, synthetic_images, device, peers, batch_size, mode, dtype, pipelines, repeats,
          batches, images, seconds, warmup, seed, op_batch_size, peak_gbps, json_path, save, results_dir,
          plot_path, isolate, quiet):
    """Augmentation throughput: images/s with all peer views finished on the device, for every
    pipeline (cpu baseline, ffcv, dali, dali-native, resident, the op alone), side by side.

    `cnm bench train` measures the train step instead (see `cnm bench train --help`).
    """
    if ctx.invoked_subcommand is not None:
        return
    from bench.augment import AugmentConfig, run_augment_bench

    cfg = AugmentConfig(data=data, device=device, peers=peers, batch_size=batch_size, mode=mode,
                        pipelines=_comma_list(pipelines, PIPELINE_CHOICES, "--pipelines"),
                        repeats=repeats, batches=batches, images=images, seconds=seconds,
                        warmup=warmup, seed=seed, dtype=dtype, synthetic_images=synthetic_images,
                        peak_gbps=peak_gbps, op_batch_size=op_batch_size)
    cfg.validate()
    if plot_path:  # fail before a long run, not after it
        from bench.report import require_matplotlib

        require_matplotlib()
    doc = run_augment_bench(cfg, progress=_progress(quiet), isolate=isolate)
    _emit(doc, json_path=json_path, save=save, results_dir=results_dir, plot_path=plot_path, quiet=quiet)


@bench.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--arch", default="resnet32", show_default=True, help="peer architecture")
@click.option("--peers", default=3, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cuda:N | cpu")
@click.option("--num-classes", default=100, show_default=True, type=int)
@click.option("--mix", default="cutnmix", show_default=True,
              type=click.Choice(["cutnmix", "cutmix", "mixup", "none"]))
@click.option("--variants", default=",".join(VARIANT_CHOICES), show_default=True,
              help="comma list of step variants to time")
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--steps", default=None, type=int, help="train steps per timed region")
@click.option("--seconds", default=1.0, show_default=True, type=float,
              help="without --steps: size each timed region to last about this long")
@click.option("--warmup", default=None, type=int,
              help="untimed steps first (default 5 on CUDA, where the graph is captured; 1 on CPU)")
@click.option("--seed", default=0, show_default=True, type=int)
@_output_options
def train(arch, peers, batch_size, device, num_classes, mix, variants, repeats, steps, seconds, warmup,
          seed, json_path, save, results_dir, plot_path, isolate, quiet):
    """Train-step throughput (images/s, ms/step) of the peer ensemble: eager fp32, channels-last,
    bf16, CUDA graphs, grouped peers (those that apply on the device)."""
    from bench.train import TrainBenchConfig, run_train_bench

    cfg = TrainBenchConfig(arch=arch, peers=peers, batch_size=batch_size, device=device,
                           num_classes=num_classes, mix=mix,
                           variants=_comma_list(variants, VARIANT_CHOICES, "--variants"),
                           repeats=repeats, steps=steps, seconds=seconds, warmup=warmup, seed=seed)
    cfg.validate()
    if plot_path:
        from bench.report import require_matplotlib

        require_matplotlib()
    doc = run_train_bench(cfg, progress=_progress(quiet), isolate=isolate)
    _emit(doc, json_path=json_path, save=save, results_dir=results_dir, plot_path=plot_path, quiet=quiet)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(bench())
