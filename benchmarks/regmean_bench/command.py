"""`regmean bench`: the paper's experiments on packaged real data, a command the harness adds to the `regmean` CLI
through the `regmean.commands` entry point (benchmarks/pyproject.toml); the library names no harness module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench(
    name: Annotated[str, typer.Argument(help="partitions, tasks, domains, ner, all, or demo")],
    seeds: Annotated[str | None, typer.Option(help="Seeds to run: 11 (seed 11), 7,8,9 or 5-9")] = None,
    num_seeds: Annotated[int | None, typer.Option(help="Run seeds 0 to N-1 (default: seed 0)")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/NAME)")] = None,
    base: Annotated[Path | None, typer.Option(help="Backbone model folder (default: packaged MiniLM)")] = None,
    train_size: Annotated[int | None, typer.Option(min=1, help="Training examples per model")] = None,
    test_size: Annotated[int | None, typer.Option(min=1, help="Examples per evaluation set")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Fine-tuning epochs")] = None,
    alpha: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="RegMean alpha of the main row")] = None,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep statistics and merged models under OUT/work")
    ] = False,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:1 ...: fine-tune, measure, merge and score there")
    ] = "cpu",
) -> None:
    """Reproduce the paper's experiments on packaged real data: fine-tune, measure, merge, evaluate, report."""
    from regmean_bench.run import parse_seeds, run_bench
    from regmean_bench.terminal import print_summary

    out = out or Path("runs") / name
    run_bench(
        name,
        parse_seeds(seeds, num_seeds),
        out,
        base,
        train_size=train_size,
        test_size=test_size,
        epochs=epochs,
        alpha=alpha,
        keep_work=keep_work,
        device=device,
    )
    print_summary(out)


def register(app: typer.Typer, reports_errors) -> None:
    """Add `bench` to the CLI `app`; `reports_errors` turns the library's errors into its one-line messages."""
    app.command("bench")(reports_errors(bench))
