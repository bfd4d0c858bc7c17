"""Fisher averaging with and without normalizing each model's Fisher, on the domains suite.

At one seed, takes the four domain models `regmean bench domains` fine-tunes (from the model cache when that seed
has run: nothing is trained again), measures each model's Fisher exactly as the bench does, prints each Fisher's
L2 norm, merges with `fisher` and with `fisher` + `normalize: true`, and scores both on the suite's evaluation sets
(macro-F1 x 100, as the domains table of docs/results.md).

    python benchmarks/fisher_normalization.py --seed 0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from regmean_bench.run import packaged_minilm  # noqa: E402
from regmean_bench.runner import Runner, Settings  # noqa: E402
from regmean_bench.suites import IN_DOMAINS, domain_data  # noqa: E402

from regmean.measure.fisher import FisherFile  # noqa: E402
from regmean.methods.fisher import fisher_norm  # noqa: E402
from regmean.scoring import score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/fisher_normalization"))
    args = parser.parse_args()
    s = Settings(base=packaged_minilm(), work=args.work)
    run = Runner("domains", args.seed, s)
    parts, evals = domain_data(args.seed, s)
    models = [run.train([p])[0] for p in parts]
    fishers = [run.fisher_stats(m, p, f"fisher{k}") for k, (m, p) in enumerate(zip(models, parts, strict=True))]
    norms = [fisher_norm(FisherFile(f)) for f in fishers]
    print("Fisher L2 norm per model: " + ", ".join(f"{d} {n:.3g}" for d, n in zip(IN_DOMAINS, norms, strict=True)))
    print(f"\n| seed {args.seed} | " + " | ".join(evals) + " | mean |")
    print("|---" * (len(evals) + 2) + "|")
    for label, options in (("fisher", {}), ("fisher, normalize", {"normalize": True})):
        folder = run.merged(label.replace(", ", "-"), "fisher", models, fishers, options=options)
        predictions = run.evaluate(folder, evals)
        f1 = [100 * score(evals[e], predictions[e])["macro_f1"] for e in evals]
        print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in f1) + f" | {sum(f1) / len(f1):.1f} |")


if __name__ == "__main__":
    main()
