"""LoRA adapters in, chat data measured: two LoRA adapters of the packaged SmolLM2-135M-Instruct, trained briefly on
two corpora as chat conversations, measured on their own conversations (`--messages-field`), merged by RegMean and
by averaging straight from the adapter folders, both as full models and as one LoRA adapter at a few ranks
(`merge --lora-rank`), and scored with `regmean evaluate` (adapters over their base directly).

    python benchmarks/smollm2_lora.py [--steps 25] [--train 160] [--test 48] [--ranks 2,4,8,16]

Each conversation is a user turn asking for a text of the corpus and the text as the assistant's answer, formatted
by SmolLM2's chat template. Writes docs/benchmarks/smollm2_lora.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, WORK, write_doc
from smollm2 import corpora, smollm2_folder

PROMPTS = {"debates": "Say something a candidate would say in a presidential debate.", "chatterbot": "Chat with me."}


def conversations(name: str, texts: list[str]) -> list[dict]:
    turns = [[{"role": "user", "content": PROMPTS[name]}, {"role": "assistant", "content": t}] for t in texts]
    return [{"messages": t} for t in turns]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_adapter(base: Path, rows: list[dict], out: Path, steps: int, seed: int) -> Path:
    """A LoRA adapter trained on the chat-formatted rows, as the LLM walkthrough's owners train theirs
    (`examples/llm/train_lora.py`: r 8, alpha 16, every attention and MLP projection)."""
    if (out / "adapter_config.json").is_file():
        return out
    sys.path.insert(0, str(ROOT / "examples" / "llm"))
    from train_lora import train

    return train(base, rows, out, steps, seed)


def weights_mb(folder: Path) -> float:
    """Megabytes of a folder's weights (a model's shards, or an adapter's file)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def update_error(folder: Path) -> float:
    """The median relative error of an adapter output's layer updates (its merge report)."""
    notes = json.loads((folder / "merge_report.json").read_text())["output_notes"]
    errors = sorted((n["lost"] / n["total"]) ** 0.5 if n["total"] else 0.0 for n in notes if n["kind"] != "kept base")
    return errors[len(errors) // 2]


def regmean(*args) -> float:
    start = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "regmean"), *map(str, args)], check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--test", type=int, default=48)
    ap.add_argument("--ranks", default="2,4,8,16", help="ranks of the adapter outputs, comma-separated")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    base, work = smollm2_folder(), WORK / "smollm2-lora"
    work.mkdir(parents=True, exist_ok=True)
    data = corpora(args.train, args.test)
    adapters, seconds = {}, {}
    for k, (name, (train, test)) in enumerate(data.items()):
        rows = write_jsonl(work / f"{name}-train.jsonl", conversations(name, train))
        write_jsonl(work / f"{name}-test.jsonl", conversations(name, test))
        adapters[name] = train_adapter(base, conversations(name, train), work / f"adapter-{name}", args.steps, k)
        if not (work / f"stats-{name}").is_dir():
            seconds[f"measure {name}"] = regmean(
                "measure", adapters[name], "--base", base, "--data", rows, "--out", work / f"stats-{name}",
                "--messages-field", "messages", "--max-length", 96, "--expose-token-counts",
            )  # fmt: skip
    rows = {"base (SmolLM2-135M-Instruct)": base} | {f"adapter {n}": adapters[n] for n in data}
    errors = {}
    for method in ("average", "regmean"):
        models = [{"path": str(adapters[n]), "statistics": str(work / f"stats-{n}")} for n in data]
        recipe = work / f"{method}.yaml"  # JSON is YAML
        recipe.write_text(json.dumps({"method": method, "base_model": str(base), "models": models}))
        rows[f"merged: {method} (full model)"] = work / f"merged-{method}"
        seconds[f"merge {method}"] = regmean("merge", recipe, work / f"merged-{method}", "--force")
        for rank in ranks:
            out = rows[f"merged: {method} as a LoRA of rank {rank}"] = work / f"lora-{method}-r{rank}"
            seconds[f"merge {method} r{rank}"] = regmean("merge", recipe, out, "--force", "--lora-rank", rank)
            errors[str(out)] = update_error(out)
    scores = {}
    for name in data:
        out = work / f"scores-{name}.json"
        out.unlink(missing_ok=True)
        regmean("evaluate", *rows.values(), "--base", base, "--data", work / f"{name}-test.jsonl",
                "--messages-field", "messages", "--max-length", 96, "--json", out)  # fmt: skip
        scores[name] = [s["perplexity"] for s in json.loads(out.read_text())]
    sizes = {label: weights_mb(folder) for label, folder in rows.items()}
    updates = {label: errors.get(str(folder)) for label, folder in rows.items()}
    write_report(args, list(rows), scores, seconds, sizes, updates)


def write_report(args, labels: list[str], scores: dict, seconds: dict, sizes: dict, updates: dict) -> None:
    names = list(scores)
    lines = [
        "# SmolLM2-135M: LoRA adapters on chat data, merged from the adapter folders",
        "",
        f"Two LoRA adapters (r 8, alpha 16, every attention and MLP projection; {args.steps} steps of 8 "
        f"conversations, 96 tokens, AdamW 1e-3) of the packaged SmolLM2-135M-Instruct, each on {args.train} "
        f"conversations of one corpus ({' and '.join(names)}) formatted by the model's chat template; statistics "
        "measured on each adapter's own conversations (`regmean measure ADAPTER --base BASE --messages-field "
        "messages`); merged by `regmean merge` from the adapter folders, as a full model and as one LoRA adapter "
        "over the base (`--lora-rank R`: each layer's merged update at rank R, RegMean's best in its own system's "
        "metric, averaging's a truncated SVD). Perplexity of the assistant turns by `regmean evaluate "
        f"--messages-field messages --base BASE` on {args.test} held-out conversations of each corpus (lower is "
        "better); weights: megabytes of safetensors in the folder; update error: the median over layers of the "
        "adapter's relative error to the full merge's update (in the layer's metric). "
        "`python benchmarks/smollm2_lora.py`.",
        "",
        "| model | " + " | ".join(f"ppl {n}" for n in names) + " | mean | weights (MB) | update error |",
        "|---|" + "---:|" * (len(names) + 3),
    ]
    for i, label in enumerate(labels):
        values = [scores[n][i] for n in names]
        error = "" if updates[label] is None else f"{updates[label]:.3f}"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.2f}" for v in values)
            + f" | {sum(values) / len(values):.2f} | {sizes[label]:.1f} | {error} |"
        )
    lines += ["", "Seconds (2 cores): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    data = {"labels": labels, "perplexity": scores, "seconds": seconds, "weights_mb": sizes, "update_error": updates}
    print(write_doc("smollm2_lora", "\n".join(lines), data))


if __name__ == "__main__":
    main()
