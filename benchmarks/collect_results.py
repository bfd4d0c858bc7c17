"""Copy each finished suite's report, plots and results.json from runs/ into docs/results/ (what docs/results.md
shows), and write docs/results/claims.md: the paper's claims checked across the suites. To add seeds later, in any
checkout: `mkdir -p runs/SUITE && cp docs/results/SUITE/results.json runs/SUITE/`, then `regmean bench SUITE`.

python benchmarks/collect_results.py [RUNS_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
from regmean_bench.claims import CLOSE_POINTS, claims

SUITES = ("partitions", "tasks", "domains", "ner")


def recipe_label(settings: dict) -> str:
    """'--train-size 1000, 5 epochs': the cap on training examples per model and the epochs of a suite's run."""
    return f"--train-size {settings['train_size']}, {settings['recipe']['epochs']} epochs"


def claims_table(found: dict[str, pd.DataFrame], recipes: dict[str, str]) -> str:
    """One row per claim, one column per suite: the method minus the reference, x 100, paired by seed, with its 95%
    t interval and the verdict from it."""
    cells: dict[str, dict[str, str]] = {}
    columns = []
    for suite, rows in found.items():
        columns.append(f"{suite} ({rows['seed'].nunique()} seeds, {recipes[suite]})")
        for c in claims(rows, suite):
            claim = c["claim"].replace("out of domain at least", "at least")  # one row for both individual checks
            cells.setdefault(claim, {})[columns[-1]] = f"{c['interval']}: {c['verdict']}"
    lines = [
        "The method (RegMean, or RegMean++ in its row) minus the reference, primary metric x 100: the mean of the "
        "per-seed differences with its 95% t interval over the seeds, and the verdict from the interval (holds: "
        f"all of it above zero; fails: all below; undecided: it spans zero; 'close to MTL' within {CLOSE_POINTS:g} "
        "points). Domains: the best individual model is compared out of domain.",
        "",
        "| claim | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for claim, row in cells.items():
        lines.append(f"| {claim} | " + " | ".join(row.get(c, "n/a") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    docs = Path(__file__).resolve().parent.parent / "docs" / "results"
    found, recipes = {}, {}
    for suite in SUITES:
        src = runs / suite
        if not (src / "report.md").is_file():
            print(f"{suite}: no report in {src}")
            continue
        dst = docs / suite
        dst.mkdir(parents=True, exist_ok=True)
        # results.json too: the finished seeds, so that a later checkout resumes the suite (copy it back to runs/)
        files = [src / "report.md", src / "results.csv", src / "results.json", *src.glob("*.png")]
        for file in [*files, *src.glob("incremental.csv")]:
            shutil.copy2(file, dst / file.name)
        found[suite] = pd.read_csv(src / "results.csv")
        recipes[suite] = recipe_label(json.loads((src / "results.json").read_text())["settings"])
        print(f"{suite}: copied to {dst}")
    if found:
        (docs / "claims.md").write_text(claims_table(found, recipes))
        print((docs / "claims.md").read_text())


if __name__ == "__main__":
    main()
