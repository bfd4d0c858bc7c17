"""Predictions, output ensembling and the paper's metrics (accuracy, macro-F1, entity F1)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import transformers as tf
from seqeval.metrics import f1_score as entity_f1

from regmean.bench.data import TextDataset
from regmean.bench.train import IGNORE, batches, tokenizer_for
from regmean.loading import check_positions, check_room_for_text, check_vocabulary_fits, load_model


def classifier_class(token_level: bool) -> type:
    return tf.AutoModelForTokenClassification if token_level else tf.AutoModelForSequenceClassification


def load_classifier(path: str | Path, token_level: bool):
    """The classifier in eval mode; refused if its checkpoint lacks the head (or any tensor) the class needs."""
    return load_model(path, cls=classifier_class(token_level))


def predict(
    path: str | Path, data: TextDataset, max_length: int = 64, batch_size: int = 64, device: str = "cpu"
) -> list[torch.Tensor]:
    """Logits per example of the classifier in folder `path` (`classify`)."""
    model = load_classifier(path, data.token_level).to(device)
    return classify(model, tokenizer_for(Path(path)), path, data, max_length, batch_size, device)


@torch.inference_mode()
def classify(
    model, tok, where: str | Path, data: TextDataset, max_length: int, batch_size: int, device: str
) -> list[torch.Tensor]:
    """Logits per example (on the CPU): [C] for sequence classification, [n_words, C] (first sub-token) for token
    level. Examples are batched in order of length (less padding), the logits returned in the data's order."""
    check_vocabulary_fits(model, tok, where)
    check_room_for_text(tok, max_length, where)
    order = sorted(range(len(data)), key=lambda i: len(" ".join(data.texts[i]) if data.token_level else data.texts[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(data)
    rows = iter(order)
    for batch in batches(tok, data, batch_size, max_length, order):
        labels = batch.pop("labels")
        check_positions(model.config, batch["input_ids"].shape[-1])
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        for row, lab in zip(logits, labels, strict=True):
            out[next(rows)] = row[lab != IGNORE] if data.token_level else row
    return out


def ensemble(predictions: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Output ensembling: the average of the models' logits, example by example."""
    return [torch.stack(per_model).mean(0) for per_model in zip(*predictions, strict=True)]


def label_f1(gold: list[int], pred: list[int], n_labels: int) -> list[float | None]:
    """Each label's F1 (None for a label neither in the gold labels nor predicted)."""
    scores: list[float | None] = []
    for c in range(n_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None)
    return scores


def macro_f1(gold: list[int], pred: list[int], n_labels: int) -> float:
    scores = [s for s in label_f1(gold, pred, n_labels) if s is not None]
    return sum(scores) / len(scores) if scores else 0.0


def per_label_f1(gold: list[int], pred: list[int], names: list[str]) -> dict[str, float]:
    """F1 by label name, for the labels the gold labels or predictions have."""
    return {n: s for n, s in zip(names, label_f1(gold, pred, len(names)), strict=True) if s is not None}


def score(data: TextDataset, logits: list[torch.Tensor]) -> dict[str, float]:
    """accuracy and macro-F1 for classification; entity F1 (seqeval) for token classification."""
    if data.token_level:
        names = data.label_names
        gold, pred = [], []
        for labels, lg in zip(data.labels, logits, strict=True):
            n = lg.shape[0]  # words beyond max_length were truncated: scored on the words the model saw
            gold.append([names[y] for y in labels[:n]])
            pred.append([names[int(i)] for i in lg.argmax(-1)])
        return {"entity_f1": float(entity_f1(gold, pred))}
    pred = [int(lg.argmax()) for lg in logits]
    acc = sum(p == y for p, y in zip(pred, data.labels, strict=True)) / len(pred)
    return {"accuracy": acc, "macro_f1": macro_f1(data.labels, pred, len(data.label_names))}


def constant(data: TextDataset) -> list[torch.Tensor]:
    """The logits of the majority-class predictor of `data`: the evaluation set's own most frequent label (tag) for
    every example (word). The best constant for accuracy and macro-F1; for entity F1 (all O) it scores 0."""
    flat = [y for labels in data.labels for y in labels] if data.token_level else list(data.labels)
    one_hot = torch.zeros(len(data.label_names))
    one_hot[Counter(flat).most_common(1)[0][0]] = 1.0
    if data.token_level:
        return [one_hot.expand(len(labels), -1) for labels in data.labels]
    return [one_hot for _ in data.labels]
