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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        chunk = [texts[(step * 8 + i) % len(texts)] for i in range(8)]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=96, add_special_tokens=False)
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"{args.out.name} step {step + 1}/{args.steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
