"""The paper's claims checked on a run: each a difference paired by seed (the method minus the reference, x 100),
with a t-based 95% interval over the seeds, and "holds", "fails" or "undecided" from that interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

PRIMARY = {"partitions": "accuracy", "tasks": "accuracy", "domains": "macro_f1", "ner": "entity_f1"}
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
"""The 0.975 quantile of Student's t with 1, 2, ... 15 degrees of freedom."""
CLOSE_POINTS = 3.0
"""'Close to multi-task learning' holds when RegMean is at most this many points below MTL."""


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the table, then a Cornish-Fisher series)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 seeds")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    seeds: int
    mean: float
    low: float
    high: float

    def verdict(self, margin: float = 0.0) -> str:
        """ "holds" when the whole interval is above -margin, "fails" when it is below, else "undecided"."""
        if self.low > -margin:
            return "holds"
        if self.high < -margin:
            return "fails"
        return "undecided"

    def __str__(self) -> str:
        if self.seeds < 2:
            return f"{self.mean:+.1f} (1 seed)"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_interval(differences: pd.Series) -> Interval:
    """Mean of per-seed differences and its 95% t interval (infinite with one seed: nothing is decided)."""
    n, mean = len(differences), float(differences.mean())
    if n < 2:
        return Interval(n, mean, -math.inf, math.inf)
    half = t_quantile(n - 1) * float(differences.std(ddof=1)) / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


def _checks(df: pd.DataFrame, suite: str) -> list[tuple[str, str, str, pd.Series]]:
    columns = df["task"] + " / " + df["eval"]
    checks = [
        ("above simple averaging", "regmean", "average", columns),
        ("above Fisher averaging", "regmean", "fisher", columns),
        ("close to multi-task learning (MTL)", "regmean", "mtl", columns),
    ]
    if suite == "domains":  # the paper's out-of-domain claim
        ood = columns[df["eval"].str.startswith("ood:")]
        checks.append(("out of domain at least as good as the best individual model", "regmean", "individual", ood))
    elif suite != "tasks":  # in `tasks` each individual model is its own task's specialist, not a competitor
        checks.append(("at least as good as the best individual model", "regmean", "individual", columns))
    checks.append(("RegMean++ above RegMean", "regmean_plusplus", "regmean", columns))
    return checks


def claims(rows: pd.DataFrame, suite: str) -> list[dict]:
    """Each claim that the run's methods allow: the two scores, the paired difference with its interval, and the
    verdict ("close to MTL" holds within CLOSE_POINTS)."""
    metric = PRIMARY.get(suite, rows["metric"].iloc[0])
    df = rows[(rows["suite"] == suite) & (rows["metric"] == metric)]
    columns = df["task"] + " / " + df["eval"]
    out = []
    for claim, method, ref, cols in _checks(df, suite):
        per_seed = df[columns.isin(cols)].groupby(["method", "seed"])["value"].mean().unstack("seed")
        if method not in per_seed.index or not per_seed.index.str.startswith(ref).any():
            continue
        if ref == "individual":  # the best individual model by mean score, the same model at every seed
            ref = per_seed[per_seed.index.str.startswith("individual:")].mean(axis=1).idxmax()
        interval = paired_interval(100 * (per_seed.loc[method] - per_seed.loc[ref]))
        out.append(
            {
                "claim": claim,
                "method": method,
                "value": 100 * per_seed.loc[method].mean(),
                "reference": ref,
                "reference_value": 100 * per_seed.loc[ref].mean(),
                "interval": interval,
                "verdict": interval.verdict(CLOSE_POINTS if ref == "mtl" else 0.0),
            }
        )
    return out


def claims_markdown(rows: pd.DataFrame, suite: str) -> str:
    metric = PRIMARY.get(suite, rows["metric"].iloc[0])
    lines = [
        f"The paper's claims ({metric} x 100, mean over the columns; the method minus the reference, paired by seed, "
        f"with its 95% t interval over the seeds; 'close to MTL' holds within {CLOSE_POINTS:g} points):",
        "",
        "| claim | method | reference | seeds | difference [95% interval] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims(rows, suite):
        lines.append(
            f"| {c['claim']} | {c['method']} {c['value']:.1f} | {c['reference']} {c['reference_value']:.1f} "
            f"| {c['interval'].seeds} | {c['interval']} | {c['verdict']} |"
        )
    return "\n".join(lines)
