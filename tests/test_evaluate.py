"""`regmean evaluate` against plain computations: the models' own forward passes, scored by hand."""

import json
import math

import pandas as pd
import torch
from conftest import TEXTS, build_model, save_model
from typer.testing import CliRunner

from regmean.cli import app
from regmean.loading import load_tokenizer

runner = CliRunner()
NAMES = ["negative", "neutral", "positive"]


def classifier(path, seed, order=NAMES):
    """A tiny BERT classifier whose head lists the labels in `order` (the same function whatever the order)."""
    model = build_model("bert", "BertForSequenceClassification", seed)
    perm = [NAMES.index(n) for n in order]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[perm])
        model.classifier.bias.copy_(model.classifier.bias[perm])
    model.config.id2label = dict(enumerate(order))
    model.config.label2id = {n: i for i, n in enumerate(order)}
    return save_model(model, path)


def predicted_names(path, texts):
    from regmean.loading import load_model

    model, tok = load_model(path), load_tokenizer(path)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def f1_by_hand(gold, pred, name):
    tp = sum(g == name == p for g, p in zip(gold, pred, strict=True))
    fp = sum(p == name != g for g, p in zip(gold, pred, strict=True))
    fn = sum(g == name != p for g, p in zip(gold, pred, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def test_classifiers_scored_by_label_name_against_their_own_predictions(tmp_path):
    a = classifier(tmp_path / "a", 1)
    b = classifier(tmp_path / "b", 1, order=["positive", "negative", "neutral"])  # same model, heads reordered
    c = classifier(tmp_path / "c", 2)
    gold = [NAMES[i % 3] for i in range(len(TEXTS))]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, gold, strict=True)))
    result = runner.invoke(
        app,
        ["evaluate", str(a), str(b), str(c), "--data", str(data), "--per-label", "--json", str(tmp_path / "s.json")],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads((tmp_path / "s.json").read_text())}
    for path in (a, c):
        pred = predicted_names(path, TEXTS)
        row = rows[str(path)]
        assert row["accuracy"] == sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
        per_label = {n: f1_by_hand(gold, pred, n) for n in NAMES}
        assert math.isclose(row["macro_f1"], sum(v for v in per_label.values() if v is not None) / 3)
        for n, v in per_label.items():
            assert math.isclose(row[f"f1[{n}]"], v)
    assert {k: v for k, v in rows[str(b)].items() if k != "model"} == {
        k: v for k, v in rows[str(a)].items() if k != "model"
    }
    assert "accuracy" in result.output and str(c) in result.output


def test_token_classifier_scores_one_on_its_own_tags(tmp_path):
    model = build_model("bert", "BertForTokenClassification", 1, num_labels=3)
    tags = ["O", "B-PER", "I-PER"]
    model.config.id2label, model.config.label2id = dict(enumerate(tags)), {t: i for i, t in enumerate(tags)}
    path = save_model(model, tmp_path / "m")
    tok = load_tokenizer(path)
    words = [t.split() for t in TEXTS]
    enc = tok(words, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    own = []
    for row, ws in enumerate(words):  # each word's tag: its first sub-token's prediction
        first = {}
        for pos, w in enumerate(enc.word_ids(row)):
            if w is not None and w not in first:
                first[w] = tags[int(logits[row, pos].argmax())]
        own.append([first[i] for i in range(len(ws))])
    assert any(t != "O" for s in own for t in s)
    pd.DataFrame({"tokens": words, "tags": own}).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    args = ["evaluate", str(path), "--data", str(tmp_path / "d.jsonl"), "--text-field", "tokens"]
    result = runner.invoke(app, [*args, "--label-field", "tags", "--csv", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "s.csv")["entity_f1"].tolist() == [1.0]


def test_perplexity_is_the_token_weighted_mean_of_each_text_alone(tmp_path):
    path = save_model(build_model("gpt2", "GPT2LMHeadModel", 1), tmp_path / "lm")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    result = runner.invoke(app, ["evaluate", str(path), "--data", str(data), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    from regmean.loading import load_model

    model, tok = load_model(path), load_tokenizer(path)
    total = tokens = 0
    with torch.no_grad():
        for text in TEXTS:  # one at a time: no padding at all
            ids = tok(text, return_tensors="pt")["input_ids"]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    got = json.loads((tmp_path / "s.json").read_text())[0]["perplexity"]
    assert math.isclose(got, math.exp(total / tokens), rel_tol=1e-4)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    a = classifier(tmp_path / "a", 1)
    other = build_model("bert", "BertForSequenceClassification", 2, num_labels=2)
    odd = save_model(other, tmp_path / "odd")
    lm = save_model(build_model("gpt2", "GPT2LMHeadModel", 1), tmp_path / "lm")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "positive"}) + "\n" for t in TEXTS))
    unknown = tmp_path / "u.jsonl"
    unknown.write_text(json.dumps({"text": "x", "label": "sarcastic"}) + "\n")
    (tmp_path / "taken.json").write_text("{}")
    cases = [
        ([a, odd], data, [], "differ from"),
        ([a, lm], data, [], "score them separately"),
        ([a], unknown, [], "sarcastic"),
        ([a], data, ["--label-field", "gold"], "no column 'gold'"),
        ([a], data, ["--json", tmp_path / "taken.json"], "exists"),
        ([a], data, ["--json", data], "data file"),
        ([a], data, ["--device", "cuda:3"], "cuda:3"),
    ]
    for models, file, extra, says in cases:
        result = runner.invoke(app, ["evaluate", *map(str, models), "--data", str(file), *map(str, extra)])
        assert result.exit_code != 0 and says in result.output, (says, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert (tmp_path / "taken.json").read_text() == "{}"


def test_seq2seq_perplexity_scores_the_targets_given_the_texts(tmp_path):
    path = save_model(build_model("t5", "T5ForConditionalGeneration", 1), tmp_path / "t5")
    targets = [f"answer {i}" for i in range(len(TEXTS))]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": t, "a": a}) + "\n" for t, a in zip(TEXTS, targets, strict=True)))
    args = ["evaluate", str(path), "--data", str(data), "--text-field", "q"]
    missing = runner.invoke(app, args)
    assert missing.exit_code != 0 and "--target-field" in missing.output
    result = runner.invoke(app, [*args, "--target-field", "a", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    from regmean.loading import load_model

    model, tok = load_model(path), load_tokenizer(path)
    total = tokens = 0
    with torch.no_grad():
        for text, target in zip(TEXTS, targets, strict=True):
            labels = tok(target, return_tensors="pt")["input_ids"]
            loss = model(input_ids=tok(text, return_tensors="pt")["input_ids"], labels=labels).loss
            total, tokens = total + float(loss) * labels.shape[1], tokens + labels.shape[1]
    got = json.loads((tmp_path / "s.json").read_text())[0]["perplexity"]
    assert math.isclose(got, math.exp(total / tokens), rel_tol=1e-4)
