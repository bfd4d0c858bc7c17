"""Copy each finished suite's report and plots from runs/ into docs/results/ (what docs/results.md shows).

python benchmarks/collect_results.py [RUNS_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SUITES = ("partitions", "tasks", "domains", "ner")


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    docs = Path(__file__).resolve().parent.parent / "docs" / "results"
    for suite in SUITES:
        src = runs / suite
        if not (src / "report.md").is_file():
            print(f"{suite}: no report in {src}")
            continue
        dst = docs / suite
        dst.mkdir(parents=True, exist_ok=True)
        for file in [src / "report.md", src / "results.csv", *src.glob("*.png"), *src.glob("incremental.csv")]:
            shutil.copy2(file, dst / file.name)
        print(f"{suite}: copied to {dst}")


if __name__ == "__main__":
    main()
