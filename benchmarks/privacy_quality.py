"""What each protection of the statistics costs in merge quality, on the bench suites.

At one seed, takes the models `regmean bench SUITE` fine-tunes (from the model cache when that seed has run:
nothing is trained again), measures each model's statistics exactly as the bench does (its owner's 1,000 training
texts, max length 64), once per protection (none, --withhold token-sites, DP at epsilon 1, 4 and 16 with delta
1e-5), merges each with RegMean (alpha 0.9, as the bench's main row), and scores every merge and the simple average
(each suite's own metric x 100: macro-F1 for domains, accuracy for tasks and partitions, entity F1 for ner). Rows
go to docs/benchmarks/privacy-quality.json (a rerun skips the seeds and suites it has); the table is rewritten.

    python benchmarks/privacy_quality.py --seed 0 [--suites domains,tasks,partitions,ner]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DOCS, write_doc  # noqa: E402
from regmean_bench.claims import PRIMARY  # noqa: E402
from regmean_bench.run import packaged_minilm  # noqa: E402
from regmean_bench.runner import TASK_PAIRS, Runner, Settings  # noqa: E402
from regmean_bench.suites import (  # noqa: E402
    PARTITION_TASKS,
    _keep_dirs,
    domain_data,
    ner_data,
    partition_data,
    task_data,
)

from regmean.io.data import Example  # noqa: E402
from regmean.measure import measure  # noqa: E402
from regmean.measure.protect import Protection  # noqa: E402
from regmean.scoring import score  # noqa: E402
from regmean.stats import save  # noqa: E402

PROTECTIONS = {
    "none": Protection(withhold=False),
    "withhold": Protection(withhold=True),
    "dp16": Protection(withhold=False, epsilon=16.0),
    "dp4": Protection(withhold=False, epsilon=4.0),
    "dp1": Protection(withhold=False, epsilon=1.0),
}
METRIC = PRIMARY  # each suite's own metric: macro-F1 (domains), accuracy (tasks, partitions), entity F1 (ner)
OUT = DOCS / "privacy-quality.json"


def owner_stats(run: Runner, model: Path, data, tag: str, protection: Protection) -> Path:
    """The model's statistics on its owner's texts, as `Runner.gram_stats` measures them, with `protection`."""
    texts = [Example(t) for t in run.owner_texts(data)]
    stats = measure(
        model, texts, max_length=run.s.recipe.max_length, batch_size=32, progress=False, protection=protection
    )
    return save(stats, run.work / "stats" / tag).parent


def groups(suite: str, seed: int, s: Settings) -> list[tuple[str, list, dict, str]]:
    """(name, training sets, evaluation sets per model, heads) of each merge the suite makes."""
    if suite == "domains":
        parts, evals = domain_data(seed, s)
        return [("tweet-domains", parts, [evals], "merge")]
    if suite == "partitions":
        return [(task, *_one_test(partition_data(task, seed, s))) for task in PARTITION_TASKS]
    if suite == "ner":
        return [("wnut", *_one_test(ner_data(seed, s)))]
    out = []
    for pair in TASK_PAIRS:
        trains, tests = zip(*(task_data(t, seed, s) for t in pair), strict=True)
        out.append(("+".join(pair), list(trains), [{t: test} for t, test in zip(pair, tests, strict=True)], "keep"))
    return out


def _one_test(data: tuple[list, object]) -> tuple[list, list[dict], str]:
    """Training parts merged into one model, scored on one test set."""
    parts, test = data
    return parts, [{"test": test}], "merge"


def run_suite(suite: str, seed: int, work: Path, **sizes) -> list[dict]:
    s = Settings(base=packaged_minilm(), work=work, **sizes)
    run = Runner(suite, seed, s)
    rows = []
    for name, trains, evals, heads in groups(suite, seed, s):
        models = [run.train([t])[0] for t in trains]
        merges = {"average": run.merged(f"{name}-average", "average", models, heads=heads)}
        for label, protection in PROTECTIONS.items():
            stats = [
                owner_stats(run, m, t, f"{name}-{label}{k}", protection)
                for k, (m, t) in enumerate(zip(models, trains, strict=True))
            ]
            merges[f"regmean:{label}"] = run.merged(
                f"{name}-regmean-{label}", "regmean", models, stats, options={"alpha": s.alpha}, heads=heads
            )
        for method, folder in merges.items():
            folders = _keep_dirs(folder, models) if heads == "keep" else [folder]
            for out, sets in zip(folders, evals, strict=True):
                for e, data in sets.items():
                    value = 100 * score(data, run.evaluate(out, {e: data})[e])[METRIC[suite]]
                    rows.append(
                        {"suite": suite, "seed": seed, "group": name, "eval": e, "method": method, "value": value}
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per suite and method: the mean over evaluation sets (then over seeds), and the paired differences per seed
    against unprotected RegMean and against the average."""
    lines = ["| suite | method | seeds | mean | - regmean:none (per seed) | - average (per seed) |", "|---" * 6 + "|"]
    for suite in sorted({r["suite"] for r in rows}):
        seeds = sorted({r["seed"] for r in rows if r["suite"] == suite})
        mean = {
            (m, sd): statistics.mean(r["value"] for r in rows if (r["suite"], r["method"], r["seed"]) == (suite, m, sd))
            for m in {r["method"] for r in rows if r["suite"] == suite}
            for sd in seeds
        }
        for method in ["average", *(f"regmean:{p}" for p in PROTECTIONS)]:
            if (method, seeds[0]) not in mean:
                continue
            values = [mean[method, sd] for sd in seeds]
            against = [
                ", ".join(f"{mean[method, sd] - mean[ref, sd]:+.1f}" for sd in seeds)
                for ref in ("regmean:none", "average")
            ]
            lines.append(
                f"| {suite} | {method} | {len(seeds)} | {statistics.mean(values):.1f} | {against[0]} | {against[1]} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suites", default="domains,tasks")
    parser.add_argument("--work", type=Path, default=Path("runs/privacy_quality"))
    parser.add_argument("--train-size", type=int, default=1000, help="(smaller only to try the script)")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT, help="rows file (another one to try the script)")
    args = parser.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    for suite in args.suites.split(","):
        if any(r["suite"] == suite and r["seed"] == args.seed for r in rows):
            continue
        rows += run_suite(suite, args.seed, args.work, train_size=args.train_size, test_size=args.test_size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    text = "# Merge quality under each protection of the statistics\n\n" + table(rows) + "\n"
    print(text)
    if args.out == OUT:
        write_doc("privacy-quality", text, rows)


if __name__ == "__main__":
    main()
