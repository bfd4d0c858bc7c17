"""The real packaged MiniLM: fine-tune two copies briefly, measure through the CLI, merge, load, run."""

import json
from pathlib import Path

import torch
import transformers as tf
import yaml
from conftest import MINILM
from safetensors.torch import load_file
from typer.testing import CliRunner

from regmean.cli import app
from regmean.stats import WITHHELD, StatisticsFile

DOMAINS = {
    "airline": (
        [
            "the flight was on time and the crew was lovely",
            "lost my bag again, worst airline ever",
            "smooth boarding and a friendly pilot",
            "three hour delay and no update from the gate",
        ],
        [1, 0, 1, 0],
    ),
    "movies": (
        [
            "a moving story with brilliant acting",
            "dull plot and wooden dialogue",
            "the soundtrack alone is worth the ticket",
            "i walked out after twenty minutes",
        ],
        [1, 0, 1, 0],
    ),
}


def fine_tune(texts, labels, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tok = tf.AutoTokenizer.from_pretrained(MINILM)
    model = tf.AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    batch = tok(texts, padding=True, return_tensors="pt")
    model.train()
    for _ in range(4):
        loss = model(**batch, labels=torch.tensor(labels)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_real_minilm_measure_merge_load(tmp_path):
    runner = CliRunner()
    models = []
    for seed, (name, (texts, labels)) in enumerate(DOMAINS.items()):
        path = fine_tune(texts, labels, tmp_path / name, seed)
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        result = runner.invoke(
            app, ["measure", str(path), "--data", str(data), "--out", str(tmp_path / f"{name}-stats")]
        )
        assert result.exit_code == 0, result.output
        models.append({"path": str(path), "statistics": str(tmp_path / f"{name}-stats")})
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump({"method": "regmean", "models": models, "options": {"alpha": 1.0, "gram_weighting": "sum"}})
    )
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output

    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        logits = merged(**tok(["what a great flight"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()

    # Optimality on real weights: on every layer, RegMean's objective sum_i ||X_i (W - W_i)^T||^2 is at most the
    # simple average's (alpha = 1, sum weighting: the paper's exact least-squares problem).
    out = load_file(tmp_path / "merged" / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    stats = [StatisticsFile(m["statistics"]) for m in models]
    # q,k,v,o,ffn in,ffn out per layer; pooler; classifier; less layer 0's q, k, v, whose site (the embeddings'
    # LayerNorm) `measure` withholds by default (its Gram decodes into token counts)
    assert len(stats[0].modules) == 6 * 6 + 2 - 3
    assert stats[0].skipped.get("bert.encoder.layer.0.attention.self.query") == WITHHELD

    def objective(w, module):
        total = 0.0
        for sd, st in zip(inputs, stats, strict=True):
            g = st.site(st.modules[module]).gram.double()
            d = w.double() - sd[f"{module}.weight"].double()
            total += float(torch.einsum("oi,ij,oj->", d, g, d))
        return total

    for module in stats[0].modules:
        average = torch.stack([sd[f"{module}.weight"] for sd in inputs]).mean(0)
        assert objective(out[f"{module}.weight"], module) <= objective(average, module) * (1 + 1e-6), module
