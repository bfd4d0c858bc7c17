"""The benchmark's summary in the terminal: a compact table per suite, what to look for, and what was found."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from regmean_bench.claims import PRIMARY
from regmean_bench.report import CONSTANT, CONSTANT_LABEL, SWEEP, cell, column_labels, summary_table

LOOK_FOR = {
    "partitions": "two models, each trained on a skewed part of one task: RegMean should beat simple averaging "
    "and come close to one model trained on both parts (mtl).",
    "tasks": "one merged body serves two different tasks, each through its own head: RegMean should score close "
    "to the individual models (each on its own task) and clearly above simple averaging.",
    "domains": "one model per tweet domain: RegMean should beat simple averaging in each domain (in:) and on "
    "domains none of the models saw (ood:).",
    "ner": "two taggers trained on different halves of WNUT-16: RegMean should beat simple averaging in entity F1.",
}
NEAR_CONSTANT = 10.0
"""An individual model within this many points of the constant predictor on its own data (at any seed) has
learned too little for the comparison to mean anything: said in the summary."""


def print_summary(out: Path, console: Console | None = None) -> None:
    """Print each suite's table from `out`/results.json, then where the full report and plots are."""
    console = console or Console()
    if not console.is_terminal:  # piped or logged: wide enough that no score wraps
        console.width = max(console.width, 160)
    rows = pd.DataFrame(json.loads((out / "results.json").read_text())["rows"])
    for suite in rows["suite"].unique():
        table = summary_table(rows, suite)
        console.print(_rich_table(table, suite, rows.loc[rows["suite"] == suite, "seed"].nunique()))
        console.print(f"[bold]What to look for[/]: {LOOK_FOR.get(suite, 'RegMean above simple averaging.')}")
        console.print(_found(table["mean"]["mean"], suite))
        for warning in _near_constant(rows, suite):
            console.print(f"[yellow]warning[/]: {warning}")
    plots = ", ".join(sorted(p.name for p in out.glob("*.png")))
    console.print(f"Full report (every method, claims with 95% intervals, timings): {out / 'report.md'}")
    console.print(f"Plots in {out}: {plots}")


def _rich_table(table: pd.DataFrame, suite: str, seeds: int) -> Table:
    means, stds = table["mean"], table["std"]
    metric = PRIMARY.get(suite, "score")
    spread = " +- std" if seeds > 1 else ""
    out = Table(title=f"{suite}: {metric} x 100{spread}, {seeds} seed(s)", title_justify="left")
    out.add_column("method", no_wrap=True)
    for label in column_labels(list(means.columns)):
        out.add_column(label, justify="right")
    for method in means.index:
        if SWEEP.match(method):
            continue
        cells = [cell(means.loc[method, c], stds.loc[method, c] if seeds > 1 else None) for c in means.columns]
        name = CONSTANT_LABEL if method == CONSTANT else method
        out.add_row(name, *cells, style="bold" if method == "regmean" else ("dim" if method == CONSTANT else None))
    return out


def _found(means: pd.Series, suite: str) -> str:
    """One line of what this run found: RegMean, simple averaging, the individual models, the constant."""
    individual = means[[m for m in means.index if m.startswith("individual")]].dropna()
    named = [("RegMean", means.get("regmean")), ("simple average", means.get("average"))]
    if len(individual) == 1:
        named.append(("individual models", individual.iloc[0]))
    elif len(individual):
        named.append(("best individual model", individual.max()))
    named.append(("constant predictor", means.get(CONSTANT)))
    parts = [f"{name} {100 * value:.1f}" for name, value in named if value is not None and not pd.isna(value)]
    return f"[bold]Found[/] (mean {PRIMARY.get(suite, 'score')} x 100): " + ", ".join(parts) + "."


def _near_constant(rows: pd.DataFrame, suite: str) -> list[str]:
    """Each individual model whose smallest margin over the constant predictor, seed by seed, on its own evaluation
    data (in:NAME for a domain's model, else every set it is scored on) is under NEAR_CONSTANT points."""
    df = rows[(rows["suite"] == suite) & (rows["metric"] == PRIMARY.get(suite, rows["metric"].iloc[0]))]
    floor = df[df["method"] == CONSTANT].set_index(["seed", "task", "eval"])["value"]
    found = []
    for method, scored in df[df["method"].str.startswith("individual")].groupby("method"):
        own = scored[scored["eval"] == f"in:{method.partition(':')[2]}"]
        gaps = 100 * (own if len(own) else scored).set_index(["seed", "task", "eval"])["value"].sub(floor).dropna()
        if len(gaps) and gaps.min() < NEAR_CONSTANT:
            seed, task, eval_name = gaps.idxmin()
            side = "above" if gaps.min() >= 0 else "below"
            found.append(
                f"{method} is {abs(gaps.min()):.1f} points {side} the constant predictor on {task} / {eval_name} "
                f"(seed {seed}): it learned too little for this comparison (more data or epochs)"
            )
    return found
