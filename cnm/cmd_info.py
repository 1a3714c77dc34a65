"""`cnm info`: CLI wiring for `pipeline.environment.describe`."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from pipeline.environment import describe


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--check", is_flag=True,
              help="Also import ffcv, DALI and triton to tell whether they work (several seconds).")
def info(as_json, check):
    """Versions, CUDA device, and which loaders and kernels are usable here."""
    env = describe(import_backends=check)
    if as_json:
        click.echo(json.dumps(env, indent=2))
        return

    console = Console()
    cuda = env["cuda"]
    git = env["git"]
    t = Table(title="cnm environment", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("python", f"{env['python']} ({env['platform']})")
    for name, ver in env["packages"].items():
        t.add_row(name, ver or "[dim]not installed[/dim]")
    t.add_row("CUDA", cuda_words(cuda, env["packages"].get("torch")))
    t.add_row("CPUs", f"{env['cpu_count']} ({env.get('cpu_model') or 'unknown model'})")
    t.add_row("git", f"{git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git else "-")
    console.print(t)

    for title, key in (("loaders (--loader)", "loaders"), ("Cut^nMix kernels", "kernels")):
        u = Table(title=title, title_justify="left")
        u.add_column("name", style="bold")
        u.add_column("usable")
        u.add_column("note")
        for name, row in env[key].items():
            usable = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "installed"}[row["usable"]]
            u.add_row(name, usable, row["note"])
        console.print(u)


def cuda_words(cuda: dict, torch_version: str | None) -> str:
    """The CUDA row of `cnm info` in plain words (`cuda`: `pipeline.environment.cuda_info()`)."""
    if cuda.get("error"):
        return f"cannot tell: torch fails to query CUDA ({cuda['error']})"
    if cuda["available"]:
        n = cuda["device_count"]
        names = ", ".join(dict.fromkeys(cuda["devices"]))
        return (f"yes, {n} GPU{'s' if n > 1 else ''}: {names} (compute capability {cuda['capability']}, "
                f"bf16 {'supported' if cuda['bf16'] else 'not supported'}); torch built for CUDA "
                f"{cuda['torch_cuda']}")
    if cuda["torch_cuda"] is None:
        return f"no: this torch ({torch_version or '?'}) is a CPU-only build; cnm trains on the CPU"
    return (f"no: torch is built for CUDA {cuda['torch_cuda']} but sees no GPU (no driver, or "
            f"CUDA_VISIBLE_DEVICES hides them); cnm trains on the CPU")
