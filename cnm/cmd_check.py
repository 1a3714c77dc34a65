"""`cnm check`: validate this machine's cnm (every stage in its own subprocess) and write a
report folder. CLI wiring only; the runner is bench/check.py, the stages bench/check_stages.py."""

from __future__ import annotations

import sys

import click

from pipeline.errors import CnmError


@click.command("check", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="report folder: summary.md, check.json, one log per stage [default: check-<host>-<date>]")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]),
              help="cuda: the GPU form of every stage; cpu: the CPU form; auto: cuda where available")
@click.option("--stages", default=None,
              help="comma list of stages to run, in the fixed order [default: all; see --list]")
@click.option("--list", "list_stages", is_flag=True, help="print the stages and what each checks, then exit")
def check(out_dir, device, stages, list_stages):
    """Validate cnm on this machine: environment, `pytest -m gpu`, the Triton op against the
    reference, op bandwidth, `cnm bench`, `cnm bench train`, a 2-epoch `cnm train`, the EMA update
    in a CUDA graph, and a world-1 NCCL group around the step's graphs. Without CUDA every stage
    runs its quick CPU form. Exit status 1 when any stage failed."""
    from bench.check import STAGE_NAMES, STAGES, default_out_dir, run_check

    if list_stages:
        for s in STAGES:
            click.echo(f"{s.name:18s} cuda: {s.cuda_check}\n{'':18s} cpu:  {s.cpu_check}")
        return
    chosen = STAGE_NAMES
    if stages is not None:
        chosen = tuple(v.strip() for v in stages.split(",") if v.strip())
        bad = [v for v in chosen if v not in STAGE_NAMES]
        if not chosen or bad:
            raise CnmError(f"--stages: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(STAGE_NAMES)}")
    out = default_out_dir() if out_dir is None else out_dir
    code = run_check(out, device=device, stages=chosen, progress=lambda m: click.echo(m, err=True))
    click.echo(f"report: {out}/summary.md", err=True)
    if code:
        click.echo("error: some stages failed (see the summary)", err=True)
        sys.exit(code)
