"""What RegMean++ costs against RegMean on the same fine-tuned MiniLMs and data, both measured in the run.

    python benchmarks/regmean_plusplus_cost.py [--models 'runs/my-models/*'] [--examples 200]

The default models are MiniLM fine-tuned on 200 tweets of each of 4 tweet domains (built once, in the bench's
cache); each gets its own slice of the packaged tweets. RegMean's
cost is every owner's `measure` plus the merge; RegMean++ measures while it merges, stage by stage, so its forward
work is about K (S + 1) / 2 passes for S stages where RegMean's is K. Prints seconds and the ratios, and the
passes the plan predicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from regmean_bench import data as D

import regmean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import chosen_models  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", help="model folders (a glob; default: 4 tweet-domain fine-tunes)")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    models = chosen_models(args.models, args.count)
    work = Path(tempfile.mkdtemp())
    texts = D.load("tweets").texts
    files, measured = [], 0.0
    stats = []
    for k, model in enumerate(models):
        part = texts[k * args.examples : (k + 1) * args.examples]
        file = work / f"data{k}.jsonl"
        file.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        files.append(file)
        examples = regmean.load_examples(file)
        st, seconds = timed(regmean.measure, model, examples, max_length=args.max_length, batch_size=32, progress=False)
        measured += seconds
        stats.append(regmean.save_statistics(st, work / f"stats{k}").parent)
    plain = regmean.MergeConfig(
        method="regmean", models=[{"path": m, "statistics": str(s)} for m, s in zip(models, stats, strict=True)]
    )
    _, merge_seconds = timed(regmean.merge, plain, work / "regmean", progress=False)
    data = [{"file": str(f), "batch_size": 32, "max_length": args.max_length} for f in files]
    plusplus = regmean.MergeConfig(
        method="regmean_plusplus", models=[{"path": m, "data": d} for m, d in zip(models, data, strict=True)]
    )
    plan = regmean.merge(plusplus, work / "pp", dry_run=True)
    _, pp_seconds = timed(regmean.merge, plusplus, work / "pp", progress=False)
    regmean_total = measured + merge_seconds
    print(f"{len(models)} MiniLM fine-tunes, {args.examples} tweets each, max length {args.max_length}")
    print(f"  plan: {plan.note}")
    print(
        f"  RegMean:   measure {measured:6.1f} s (all owners) + merge {merge_seconds:5.1f} s = {regmean_total:6.1f} s"
    )
    print(
        f"  RegMean++: {pp_seconds:6.1f} s  ({pp_seconds / regmean_total:.1f}x RegMean's measure + merge, "
        f"{pp_seconds / measured:.1f}x the owners' measuring)"
    )


if __name__ == "__main__":
    main()
