"""Measuring long sequences: SmolLM2-135M at 2,048 tokens per example, the memory `measure` announces before the work
against the peak resident memory of the whole run, and the time per token.

    python benchmarks/long_sequences.py [--examples 4] [--batch-sizes 1,4]

Each run is `regmean measure` in a process of its own (its peak resident set read from the kernel, getrusage of the
child); the texts are debate transcripts concatenated until each is longer than 2,048 tokens, so every batch is
full length. Writes docs/benchmarks/long_sequences.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import WORK, machine, write_doc  # noqa: E402
from regmean_bench.data import load  # noqa: E402
from smollm2 import smollm2_folder  # noqa: E402

MAX_LENGTH = 2048


def long_texts(count: int, tokenizer) -> list[str]:
    """`count` texts of more than MAX_LENGTH tokens each, made of consecutive debate transcript lines."""
    lines = load("debates").texts
    texts, current = [], []
    for line in lines:
        current.append(line)
        if len(tokenizer(" ".join(current))["input_ids"]) > MAX_LENGTH:
            texts.append(" ".join(current))
            current = []
            if len(texts) == count:
                return texts
    raise SystemExit(f"the debates corpus has fewer than {count} texts of {MAX_LENGTH} tokens")


def run_measure(model: Path, data: Path, batch_size: int, out: Path) -> dict:
    """One `regmean measure` in a child process: its announced memory, its real peak, its time."""
    cmd = [sys.executable, "-m", "regmean", "measure", str(model), "--data", str(data), "--out", str(out)]
    cmd += ["--expose-token-counts", "--max-length", str(MAX_LENGTH), "--batch-size", str(batch_size), "--force"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    announced = next(
        line[line.index("memory: ") :] for line in (done.stdout + done.stderr).splitlines() if "memory: " in line
    )
    estimate = re.search(r"about ([\d.]+) (\w+)", announced)
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    return {
        "batch_size": batch_size,
        "announced": announced,
        "estimate_bytes": float(estimate.group(1)) * units[estimate.group(2)],
        "peak_rss_bytes": peak if peak > before * 1024 else None,
        "seconds": seconds,
    }


def row(run: dict, tokens: int) -> str:
    peak = "-" if run["peak_rss_bytes"] is None else f"{run['peak_rss_bytes'] / 1e9:.2f}"
    return (
        f"| {run['batch_size']} | {run['estimate_bytes'] / 1e9:.2f} | {peak} | {run['seconds']:.0f} | "
        f"{tokens / run['seconds']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = smollm2_folder()
    texts = long_texts(args.examples, AutoTokenizer.from_pretrained(model))
    data = WORK / "long_texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sizes = sorted(int(b) for b in args.batch_sizes.split(","))  # ascending: each child's peak is the largest yet
    runs = [run_measure(model, data, b, WORK / f"long-stats-{b}") for b in sizes]
    rows = [row(r, args.examples * MAX_LENGTH) for r in runs]
    text = "\n".join(
        [
            "# Measuring long sequences (SmolLM2-135M, 2,048 tokens per example)",
            "",
            f"Machine: {machine()}. `python benchmarks/long_sequences.py --examples {args.examples} "
            f"--batch-sizes {args.batch_sizes}`: {args.examples} debate texts of more than 2,048 tokens, "
            "`regmean measure --max-length 2048`, float32 forward and sums, one process per run.",
            "",
            "| batch | announced before measuring (GB) | peak resident set of the run (GB) | seconds | tokens/s |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "The announcement is the model, one block of sums and a forward pass measured on the first batch "
            "(the resident set's high-water mark, reset before that pass); the peak is the kernel's for the whole "
            "process. What `measure` printed:",
            "",
            *[f"- batch {r['batch_size']}: `{r['announced']}`" for r in runs],
        ]
    )
    print(write_doc("long_sequences", text + "\n", {"runs": runs, "examples": args.examples}))


if __name__ == "__main__":
    main()
