"""Measuring speed: statistics collection vs a plain inference forward over the same batches, and vs
FusionBench 0.2.33's RegMean Gram collection (installed in its own environment by this script).

    python benchmarks/measure_speed.py [--skip-fusionbench]

MiniLM (the packaged all-MiniLM-L6-v2) and SmolLM2-135M on real tweets, batch 16, right padding to the longest
in the batch, up to 128 tokens, float32 on CPU; each timing is the median of 3. Writes docs/benchmarks/measure_speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, WORK, machine, side_venv, write_doc  # noqa: E402
from regmean_bench.data import load  # noqa: E402
from regmean_bench.run import packaged_minilm  # noqa: E402
from smollm2 import smollm2_folder  # noqa: E402

from regmean.io.data import Example  # noqa: E402
from regmean.loading import load_model, load_tokenizer  # noqa: E402
from regmean.measure import measure  # noqa: E402
from regmean.measure.accumulate import Accumulator  # noqa: E402
from regmean.measure.batching import forward, make_batches  # noqa: E402
from regmean.measure.protect import Protection  # noqa: E402
from regmean.measure.sites import detect_sites, select_modules  # noqa: E402

BATCH, MAX_LENGTH = 16, 128

EVERY_SITE = Protection(withhold=False)  # the same sites as the accumulator timed beside it


def ours(model_dir: Path, texts: list[str]) -> dict:
    """Plain forward, our collection (hooks over the same batches, model loaded) and the whole `measure` call."""
    examples = [Example(t) for t in texts]
    model = load_model(model_dir)
    batches = list(make_batches(examples, load_tokenizer(model_dir), model, BATCH, MAX_LENGTH, "cpu"))
    tokens = sum(int(b.masks["input"].sum()) for b in batches)
    sites = detect_sites(model, select_modules(model, None, None)[0], batches[0])
    out: dict[str, list[float]] = {"forward_s": [], "regmean_s": [], "measure_call_s": []}
    for _ in range(3):
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                forward(model, b)
        out["forward_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        acc = Accumulator(model, sites, torch.float32, "cpu")
        with torch.inference_mode():
            for b in batches:
                acc.run(b)
        acc.finish()
        acc.close()
        out["regmean_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        measure(model_dir, examples, batch_size=BATCH, max_length=MAX_LENGTH, progress=False, protection=EVERY_SITE)
        out["measure_call_s"].append(time.perf_counter() - t)
    return {"tokens": tokens} | {k: statistics.median(v) for k, v in out.items()}


def fusionbench(model_dir: Path, texts_file: Path) -> dict:
    bin_dir = side_venv("fusionbench", "fusion-bench==0.2.33")
    script = Path(__file__).resolve().parent / "fusionbench_collect.py"
    cmd = [str(bin_dir / "python"), str(script), str(model_dir), str(texts_file), str(BATCH), str(MAX_LENGTH)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"})
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: statistics.median(v) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-fusionbench", action="store_true")
    ap.add_argument("--texts", type=int, default=256)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    texts = load("tweets").texts[: args.texts]
    texts_file = WORK / "tweets-speed.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rows = {}
    for name, folder in (("MiniLM-L6", packaged_minilm()), ("SmolLM2-135M", smollm2_folder())):
        row = ours(folder, texts)
        if not args.skip_fusionbench:
            row["fusionbench"] = fusionbench(folder, texts_file)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    lines = [
        "# Measuring speed",
        "",
        f"{args.texts} real tweets, batch {BATCH}, right-padded to the longest in each batch, at most {MAX_LENGTH} "
        f"tokens, float32 on CPU; median of 3. Tokens/s counts real (non-padding) tokens. Machine: {machine()}.",
        "Forward and collection timings run over the same prepared batches with the model loaded; the whole "
        "`regmean measure` call (loading, tokenising, hashing the weights, detecting sites) is listed apart. "
        "FusionBench's collection hooks every linear separately, keeps padding rows and updates a running mean.",
        "",
        "| model | plain forward tok/s | regmean collection tok/s | collection / forward time | whole measure call s "
        "| FusionBench tok/s "
        "| FusionBench / forward time (its env) | FusionBench time / ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        n = r["tokens"]
        fb = r.get("fusionbench")
        fb_cells = (
            f"{n / fb['fusionbench_s']:.0f} | {fb['fusionbench_s'] / fb['forward_s']:.2f} | "
            f"{fb['fusionbench_s'] / r['regmean_s']:.2f}"
            if fb
            else "n/a | n/a | n/a"
        )
        lines.append(
            f"| {name} | {n / r['forward_s']:.0f} | {n / r['regmean_s']:.0f} | {r['regmean_s'] / r['forward_s']:.2f} "
            f"| {r['measure_call_s']:.1f} | {fb_cells} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_doc("measure_speed", text, {"rows": rows, "root": str(ROOT)})


if __name__ == "__main__":
    main()
