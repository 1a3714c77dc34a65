"""`cnm info`: CLI wiring for `pipeline.environment.describe`."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from pipeline.environment import describe


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(as_json):
    """Versions, CUDA device, and which loaders and kernels are usable here."""
    env = describe()
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
    if cuda["available"]:
        devices = ", ".join(cuda["devices"])
        t.add_row("CUDA", f"yes: {cuda['device_count']} device(s): {devices} (sm {cuda['capability']}, "
                          f"bf16 {'yes' if cuda['bf16'] else 'no'}); torch CUDA {cuda['torch_cuda']}")
    else:
        why = f" ({cuda['error']})" if cuda.get("error") else ""
        t.add_row("CUDA", f"no{why}; torch built for CUDA {cuda['torch_cuda'] or '-'}")
    t.add_row("CPUs", f"{env['cpu_count']} ({env.get('cpu_model') or 'unknown model'})")
    t.add_row("git", f"{git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git else "-")
    console.print(t)

    for title, key in (("loaders (--loader)", "loaders"), ("Cut^nMix kernels", "kernels")):
        u = Table(title=title, title_justify="left")
        u.add_column("name", style="bold")
        u.add_column("usable")
        u.add_column("note")
        for name, row in env[key].items():
            u.add_row(name, "[green]yes[/green]" if row["usable"] else "[red]no[/red]", row["note"])
        console.print(u)
