"""The benchmark's summary in the terminal: a compact table per suite, what to look for, and what was found."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from regmean.bench.claims import PRIMARY
from regmean.bench.report import CONSTANT, CONSTANT_LABEL, SWEEP, column_labels, summary_table

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
"""An individual model within this many points of the constant predictor on its own data has learned too little
for the comparison to mean anything: said in the summary."""


def print_summary(out: Path, console: Console | None = None) -> None:
    """Print each suite's table from `out`/results.json, then where the full report and plots are."""
    console = console or Console()
    rows = pd.DataFrame(json.loads((out / "results.json").read_text())["rows"])
    for suite in rows["suite"].unique():
        table = summary_table(rows, suite)
        console.print(_rich_table(table, suite, rows.loc[rows["suite"] == suite, "seed"].nunique()))
        console.print(f"[bold]What to look for[/]: {LOOK_FOR.get(suite, 'RegMean above simple averaging.')}")
        console.print(_found(table["mean"]["mean"], suite))
        for warning in _near_constant(table["mean"]):
            console.print(f"[yellow]warning[/]: {warning}")
    plots = ", ".join(sorted(p.name for p in out.glob("*.png")))
    console.print(f"Full report (every method, claims with 95% intervals, timings): {out / 'report.md'}")
    console.print(f"Plots in {out}: {plots}")


def _rich_table(table: pd.DataFrame, suite: str, seeds: int) -> Table:
    means, stds = table["mean"], table["std"]
    metric = PRIMARY.get(suite, "score")
    spread = " +- std" if seeds > 1 else ""
    out = Table(title=f"{suite}: {metric} x 100{spread}, {seeds} seed(s)", title_justify="left")
    out.add_column("method")
    for label in column_labels(list(means.columns)):
        out.add_column(label, justify="right")
    for method in means.index:
        if SWEEP.match(method):
            continue
        cells = [
            "-" if pd.isna(means.loc[method, c]) else _cell(means.loc[method, c], stds.loc[method, c], seeds > 1)
            for c in means.columns
        ]
        name = CONSTANT_LABEL if method == CONSTANT else method
        out.add_row(name, *cells, style="bold" if method == "regmean" else ("dim" if method == CONSTANT else None))
    return out


def _cell(mean: float, std: float, with_std: bool) -> str:
    return f"{100 * mean:.1f} +- {100 * std:.1f}" if with_std else f"{100 * mean:.1f}"


def _found(means: pd.Series, suite: str) -> str:
    """One line of what this run found: RegMean, simple averaging, the individual models, the constant."""
    individual = means[[m for m in means.index if m.startswith("individual")]]
    parts = [f"RegMean {100 * means.get('regmean', float('nan')):.1f}"]
    parts.append(f"simple average {100 * means.get('average', float('nan')):.1f}")
    if len(individual) == 1:
        parts.append(f"individual models {100 * individual.iloc[0]:.1f}")
    elif len(individual):
        parts.append(f"best individual model {100 * individual.max():.1f}")
    if CONSTANT in means.index:
        parts.append(f"constant predictor {100 * means[CONSTANT]:.1f}")
    return f"[bold]Found[/] (mean {PRIMARY.get(suite, 'score')} x 100): " + ", ".join(parts) + "."


def _near_constant(means: pd.DataFrame) -> list[str]:
    """Each individual model within NEAR_CONSTANT points of the constant predictor on its own evaluation data."""
    if CONSTANT not in means.index:
        return []
    columns = [c for c in means.columns if c != "mean"]
    found = []
    for method in (m for m in means.index if m.startswith("individual")):
        name = method.partition(":")[2]
        own = [c for c in columns if name and name in c.split(" / ")[-1]] or columns
        for column in own:
            gap = 100 * (means.loc[method, column] - means.loc[CONSTANT, column])
            if not pd.isna(gap) and gap < NEAR_CONSTANT:
                found.append(
                    f"{method} is {gap:.1f} points above the constant predictor on {column}: "
                    "it learned too little for this comparison (more data or epochs)"
                )
    return found
