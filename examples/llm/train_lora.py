"""An owner's own fine-tuning (not part of regmean): a LoRA adapter of a causal LM trained briefly on chat data.

    python examples/llm/train_lora.py BASE DATA.jsonl OUT [--steps 12]

r 8, alpha 16, every attention and MLP projection; batches of 8 conversations formatted by the model's chat template,
96 tokens, AdamW 1e-3. Saves a peft adapter folder (what `measure`, `merge` and `evaluate` take with --base).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train(base: Path, rows: list[dict], out: Path, steps: int, seed: int = 0) -> Path:
    """Train the adapter on the conversations `rows` ({"messages": [...]}) and save it to `out`."""
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        chunk = [texts[(step * 8 + i) % len(texts)] for i in range(8)]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=96, add_special_tokens=False)
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"{out.name} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    print(f"wrote {train(args.base, rows, args.out, args.steps)}")


if __name__ == "__main__":
    main()
