"""Which CPU fine-tuning recipe makes every individual model of a suite learn its task?

For each suite and candidate recipe, fine-tunes the suite's individual models at one seed exactly as `regmean bench`
does (same data, same cache: the models found here are reused by the bench run of that recipe), scores each on its
own evaluation data with the suite's metric, and prints its margin over the constant (majority-class) predictor of
that data. The bar (issue 14): every model at least 15 points above the constant; NER entity F1 at least 25.

    python benchmarks/recipe_search.py --suites domains,ner --train-size 1000 --recipes 2:2e-4,5:2e-4,10:5e-4
    python benchmarks/recipe_search.py --out docs/results/recipe_search.json   # adds to the file, resumes

Each recipe is EPOCHS:LR (the rest as `regmean bench`: batch 16, max 64 tokens, 6% warm-up, linear decay).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: E402
from regmean_bench.baselines import constant  # noqa: E402
from regmean_bench.claims import PRIMARY  # noqa: E402
from regmean_bench.run import packaged_minilm  # noqa: E402
from regmean_bench.runner import Settings  # noqa: E402
from regmean_bench.suites import own_tasks  # noqa: E402
from regmean_bench.train import Recipe, fine_tune  # noqa: E402

from regmean.scoring import predict, score

BAR = {"ner": 25.0}  # absolute entity F1; elsewhere the margin over the constant predictor
MARGIN = 15.0


def parse_recipes(text: str) -> list[Recipe]:
    recipes = []
    for item in text.split(","):
        epochs, _, lr = item.partition(":")
        recipes.append(replace(Recipe(), epochs=int(epochs), lr=float(lr)))
    return recipes


def probe(suite: str, recipe: Recipe, seed: int, settings: Settings, only: list[str]) -> list[dict]:
    """Fine-tune (or reuse) each individual model of `suite`, score it and the constant predictor on its own data."""
    metric = PRIMARY[suite]
    rows = []
    for task in own_tasks(suite, seed, settings):
        if only and not any(name in task.train.name for name in only):
            continue
        start = time.perf_counter()
        (model,) = fine_tune(settings.base, [task.train], recipe, seed, log=lambda _: None)
        trained = time.perf_counter() - start
        got = 100 * score(task.test, predict(model, task.test, recipe.max_length))[metric]
        floor = 100 * score(task.test, constant(task.test))[metric]
        passed = got >= BAR[suite] if suite in BAR else got - floor >= MARGIN
        rows.append(
            {
                "suite": suite,
                "model": task.train.name,
                "train": len(task.train),
                "epochs": recipe.epochs,
                "lr": recipe.lr,
                "metric": metric,
                "score": round(got, 1),
                "constant": round(floor, 1),
                "margin": round(got - floor, 1),
                "passes": passed,
                "fine_tune_s": round(trained, 1),
            }
        )
        print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    return rows


def _key(row: dict) -> tuple:
    return row["suite"], row["model"], row["train"], row["seed"], row["epochs"], row["lr"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="partitions,tasks,domains,ner")
    ap.add_argument("--recipes", default="2:2e-4,5:2e-4,5:5e-4,10:5e-4", help="EPOCHS:LR,...")
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="only the models whose data name has one of these: selfdriving,part0")
    ap.add_argument("--out", type=Path, help="JSON file to add the rows to")
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()
    settings = Settings(
        base=packaged_minilm(), work=Path("."), train_size=args.train_size, test_size=args.test_size, log=lambda _: None
    )
    only = [name for name in args.only.split(",") if name]
    done = json.loads(args.out.read_text()) if args.out and args.out.is_file() else []
    print("suite | model | train | epochs | lr | metric | score | constant | margin | passes | fine_tune_s")
    for suite in args.suites.split(","):
        for recipe in parse_recipes(args.recipes):
            rows = [
                {**r, "seed": args.seed, "recipe": asdict(recipe)}
                for r in probe(suite, recipe, args.seed, settings, only)
            ]
            new = {_key(r) for r in rows}
            done = [r for r in done if _key(r) not in new] + rows
            if args.out:
                args.out.write_text(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
