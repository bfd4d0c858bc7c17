"""The scores of a classifier on labelled data, as `evaluate` and the bench report them: accuracy and macro-F1 for
sequence classification, entity F1 (exact spans, CoNLL chunking) for token classification."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from regmean.io.labelled import IGNORE, TextDataset, batches
from regmean.loading import check_positions, check_room_for_text, check_vocabulary_fits, load_model, load_tokenizer


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
    return classify(model, load_tokenizer(path), path, data, max_length, batch_size, device)


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


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """The (type, first, last) entities of one sentence's IOB/IOBES tags, chunked as CoNLL's conlleval chunks them
    (an I- after O or after another type starts an entity; B-, S-, O or a change of type ends one)."""
    spans, start, prev, prev_type = set(), 0, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = tag[:1], tag[1:].split("-", 1)[-1] or "_"
        if _chunk_ends(prev, prefix, prev_type != kind):
            spans.add((prev_type, start, i - 1))
        if _chunk_starts(prev, prefix, prev_type != kind):
            start = i
        prev, prev_type = prefix, kind
    return spans


def _chunk_ends(prev: str, prefix: str, new_type: bool) -> bool:
    return (
        prev in ("E", "S")
        or (prev in ("B", "I") and prefix in ("B", "S", "O"))
        or (prev not in ("O", ".") and new_type)
    )


def _chunk_starts(prev: str, prefix: str, new_type: bool) -> bool:
    return (
        prefix in ("B", "S")
        or (prev in ("E", "S", "O") and prefix in ("E", "I"))
        or (prefix not in ("O", ".") and new_type)
    )


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """Micro-averaged F1 over exact entities (type and span), summed over sentences; 0 when neither side has one."""
    true = pred_n = correct = 0
    for g, p in zip(gold, pred, strict=True):
        gold_spans, pred_spans = entity_spans(g), entity_spans(p)
        true, pred_n, correct = true + len(gold_spans), pred_n + len(pred_spans), correct + len(gold_spans & pred_spans)
    return 2 * correct / (true + pred_n) if true + pred_n else 0.0


def score(data: TextDataset, logits: list[torch.Tensor]) -> dict[str, float]:
    """accuracy and macro-F1 for classification; entity F1 for token classification."""
    if data.token_level:
        names = data.label_names
        gold, pred = [], []
        for labels, lg in zip(data.labels, logits, strict=True):
            n = lg.shape[0]  # words beyond max_length were truncated: scored on the words the model saw
            gold.append([names[y] for y in labels[:n]])
            pred.append([names[int(i)] for i in lg.argmax(-1)])
        return {"entity_f1": entity_f1(gold, pred)}
    pred = [int(lg.argmax()) for lg in logits]
    acc = sum(p == y for p, y in zip(pred, data.labels, strict=True)) / len(pred)
    return {"accuracy": acc, "macro_f1": macro_f1(data.labels, pred, len(data.label_names))}
