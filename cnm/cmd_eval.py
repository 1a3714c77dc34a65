"""`cnm eval RUN_OR_CHECKPOINT [--data DIR]`: test accuracies of a trained ensemble (wiring only;
the work is `trainer.evaluate.evaluate_checkpoint`)."""

from __future__ import annotations

import click


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_or_checkpoint", type=click.Path())
@click.option("--data", "data", default=None, metavar="DIR",
              help="prepared dataset directory [default: the run's --data]")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="evaluation device")
@click.option("--batch-size", type=int, default=1000, show_default=True, help="evaluation batch size")
@click.option("--quiet", is_flag=True, default=False, help="plain text instead of a table")
def eval_(run_or_checkpoint, data, device, batch_size, quiet):
    """Accuracy of every peer, the peer ensemble, every EMA teacher peer and the teacher ensemble
    on the test split, and the % of test images two peers predict differently; printed and
    written to eval-<checkpoint>.json next to the checkpoint (RUN/eval-best.json, RUN/eval-last.json)."""
    from trainer.evaluate import evaluate_checkpoint
    from trainer.progress import accuracy_table

    result = evaluate_checkpoint(run_or_checkpoint, data=data, device=device, batch_size=batch_size)
    if quiet:
        line = "  ".join(f"peer{k} {a:.2f}" for k, a in enumerate(result["test_acc"]))
        line += f"  ensemble {result['ensemble_acc']:.2f}"
        if result.get("teacher_acc") is not None:
            line += "  " + "  ".join(f"teacher{k} {a:.2f}" for k, a in enumerate(result["teacher_acc"]))
            line += f"  teacher-ensemble {result['teacher_ensemble_acc']:.2f}"
        if result["disagreement"] is not None:
            line += f"  disagreement {result['disagreement']:.2f}"
        click.echo(line)
    else:
        from rich.console import Console

        Console().print(accuracy_table(result, title=f"{result['checkpoint']} (epoch {result['epoch']}, "
                                                     f"{result['test_images']} test images)"))
    click.echo(f"wrote {result['eval_json']}", err=quiet)
