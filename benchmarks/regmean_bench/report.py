"""Benchmark reports: results.json / results.csv, a markdown table (mean +- std over seeds), PNG plots, timings."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from regmean_bench.claims import PRIMARY, claims_markdown  # noqa: E402
from regmean_bench.runner import Results  # noqa: E402

CONSTANT, CONSTANT_LABEL = "constant", "constant (majority class)"
SWEEP = re.compile(r"regmean\(alpha=([0-9.]+)\)")


def _method_order(methods: list[str]) -> list[str]:
    def key(m: str):
        order = [
            "constant",
            "individual",
            "average",
            "task_arithmetic",
            "ties",
            "dare",
            "fisher",
            "ensemble",
            "regmean",
        ]
        order += ["regmean_plusplus", "mtl"]
        head = m.split(":")[0].split("(")[0]
        return (order.index(head) if head in order else len(order), "(" in m, m)

    return sorted(methods, key=key)


def summary_table(rows: pd.DataFrame, suite: str) -> pd.DataFrame:
    """Methods x (task / eval) of the suite's primary metric: mean and std over seeds, plus the column mean."""
    metric = PRIMARY.get(suite, rows["metric"].iloc[0])
    df = rows[(rows["suite"] == suite) & (rows["metric"] == metric)].copy()
    df["column"] = df["task"] + " / " + df["eval"]
    per_seed = df.pivot_table(index=["method", "seed"], columns="column", values="value")
    per_seed["mean"] = per_seed.mean(axis=1, skipna=False)  # methods missing a column get no mean
    mean = per_seed.groupby(level="method").mean()
    std = per_seed.groupby(level="method").std().fillna(0.0)
    out = pd.concat({"mean": mean, "std": std}, axis=1)
    return out.reindex(_method_order(list(out.index)))


def column_labels(columns: list[str]) -> list[str]:
    """Short names of "task / eval" columns: the eval set's name where that alone is unique."""
    evals = [c.split(" / ")[-1] for c in columns]
    return [e if evals.count(e) == 1 else c for c, e in zip(columns, evals, strict=True)]


def cell(mean: float, std: float | None = None) -> str:
    """A score x 100 for a table: "-" where missing, with "+- std" where given."""
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} +- {100 * std:.1f}"


def markdown(table: pd.DataFrame, suite: str, seeds: int) -> str:
    metric = PRIMARY.get(suite, "score")
    cols = list(table["mean"].columns)
    lines = [
        f"**{suite}**: {metric} x 100, mean +- std over {seeds} seed(s)",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for method in table.index:
        cells = []
        for c in cols:
            m, s = table.loc[method, ("mean", c)], table.loc[method, ("std", c)]
            cells.append(cell(m, s))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_markdown(times: pd.DataFrame) -> str:
    per_seed = times.groupby(["suite", "seed", "step"])["seconds"].sum().reset_index()
    table = per_seed.groupby(["suite", "step"])["seconds"].mean().unstack("step").fillna(0.0)
    cols = list(table.columns)
    lines = [
        "Wall time per seed, seconds (sum over all models and merges of the step):",
        "",
        "| suite | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for suite, row in table.iterrows():
        lines.append(f"| {suite} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def bar_chart(table: pd.DataFrame, suite: str, path: Path) -> None:
    means, stds = table["mean"], table["std"]
    methods = [m for m in means.index if not SWEEP.match(m) and m != CONSTANT]
    cols = list(means.columns)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cols) * max(1, len(methods)) / 4) + 2, 4))
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        xs = [i + k * width for i in range(len(cols))]
        ax.bar(xs, means.loc[method] * 100, width, yerr=stds.loc[method] * 100, label=method, capsize=2)
    if CONSTANT in means.index:  # the floor, as a dotted line across each column's bars
        starts = [i - width / 2 for i in range(len(cols))]
        ends = [x + 0.8 for x in starts]
        levels = means.loc[CONSTANT] * 100
        ax.hlines(levels, starts, ends, colors="k", linestyles=":", zorder=3, label=CONSTANT_LABEL)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(cols))], column_labels(cols), rotation=20, ha="right", fontsize=8
    )
    ax.set_ylabel(f"{PRIMARY.get(suite, 'score')} x 100")
    ax.set_title(f"{suite}: RegMean vs baselines")
    shown = [*methods, *([CONSTANT] if CONSTANT in means.index else [])]
    low = (means.loc[shown].min().min() * 100) if shown else 0
    ax.set_ylim(max(0, low - 10), None)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the bars, hiding none
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def alpha_chart(table: pd.DataFrame, suite: str, path: Path) -> bool:
    means = table["mean"]["mean"]
    points = sorted((float(SWEEP.match(m).group(1)), v) for m, v in means.items() if SWEEP.match(m))
    if "regmean" not in means.index or not points:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([a for a, _ in points], [100 * v for _, v in points], "o-", label="RegMean (sweep)")
    if "average" in means.index:
        ax.axhline(100 * means["average"], ls="--", color="gray", label="simple average")
    ax.set_xlabel("alpha (off-diagonal multiplier)")
    ax.set_ylabel(f"mean {PRIMARY.get(suite, 'score')} x 100")
    ax.set_title(f"{suite}: alpha sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def curve_chart(curves: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, df in curves.groupby("method"):
        g = df.groupby("n_models")["ood_macro_f1"]
        ax.errorbar(g.mean().index, 100 * g.mean(), yerr=100 * g.std().fillna(0), marker="o", capsize=3, label=method)
    ax.set_xlabel("models merged (added in order of OOD score)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("OOD macro-F1 x 100")
    ax.set_title("incremental merging")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Results, out: Path, settings: dict, seeds: list[int]) -> str:
    """Write every artefact to `out`; return the markdown report (also saved as report.md)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": settings, "seeds": seeds, **asdict(results)}, indent=1))
    rows, times = pd.DataFrame(results.rows), pd.DataFrame(results.times)
    rows.to_csv(out / "results.csv", index=False)
    parts = []
    for suite in rows["suite"].unique():
        table = summary_table(rows, suite)
        parts.append(markdown(table, suite, rows.loc[rows["suite"] == suite, "seed"].nunique()))
        parts.append(claims_markdown(rows, suite))
        bar_chart(table, suite, out / f"{suite}.png")
        parts.append(f"![{suite}]({suite}.png)")
        if alpha_chart(table, suite, out / f"{suite}-alpha.png"):
            parts.append(f"![{suite} alpha sweep]({suite}-alpha.png)")
    if results.curves:
        curves = pd.DataFrame(results.curves)
        curves.to_csv(out / "incremental.csv", index=False)
        curve_chart(curves, out / "incremental.png")
        parts.append("![incremental merging](incremental.png)")
    parts.append(timing_markdown(times))
    report = "\n\n".join(parts) + "\n"
    (out / "report.md").write_text(report)
    return report
