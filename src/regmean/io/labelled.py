"""Labelled data for classifiers: texts (or word lists) with label ids, read from a user's file and tokenised into
batches whose labels sit where a classifier's loss and scoring read them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from regmean.errors import RegmeanError
from regmean.io.data import read_table, text_cell
from regmean.loading import bounded_text

IGNORE = -100
"""The label of a position no loss or score reads (padding, a word's later sub-tokens)."""


@dataclass
class TextDataset:
    """Texts with integer labels. For token classification, `texts` hold word lists and `labels` tag-id lists."""

    name: str
    texts: list
    labels: list
    label_names: list[str]
    domains: list[str] = field(default_factory=list)
    token_level: bool = False

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index, name: str | None = None) -> TextDataset:
        index = list(index)
        return replace(
            self,
            name=name or self.name,
            texts=[self.texts[i] for i in index],
            labels=[self.labels[i] for i in index],
            domains=[self.domains[i] for i in index] if self.domains else [],
        )

    def label_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {n: counts.get(i, 0) for i, n in enumerate(self.label_names)}


def batches(tok, data: TextDataset, batch_size: int, max_length: int, order=None) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches in `order` (default: the data's); token-level labels go on each word's first sub-token
    (the others, and padding, are IGNORE)."""
    order = list(range(len(data))) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = [data.texts[i] for i in idx]
        if not data.token_level:
            texts = [bounded_text(tok, t, max_length) for t in texts]
            enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc["labels"] = torch.tensor([data.labels[i] for i in idx])
            yield dict(enc)
            continue
        enc = tok(
            texts, is_split_into_words=True, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        labels = torch.full(enc["input_ids"].shape, IGNORE)
        for row, i in enumerate(idx):
            previous = None
            for pos, word in enumerate(enc.word_ids(row)):
                if word is not None and word != previous:
                    labels[row, pos] = data.labels[i][word]
                previous = word
        enc = dict(enc)
        enc["labels"] = labels
        yield enc


def read_labelled(path: Path, token_level: bool, text_field: str = "text", label_field: str = "label") -> TextDataset:
    """A JSONL / CSV / Parquet file as texts (or word lists) and label names (or tag lists), label ids in sorted
    order of the names; a row with a text but no label, or a label that is not a name, is refused."""
    path = Path(path)
    table = read_table(path)
    for f in (text_field, label_field):
        if f not in table.columns:
            raise RegmeanError(f"{path}: no column {f!r}; columns are {', '.join(map(str, table.columns))}")
    missing = table[label_field].isna() & table[text_field].notna()
    if bool(missing.any()):
        row = int(missing.to_numpy().nonzero()[0][0]) + 1
        raise RegmeanError(f"{path}: row {row} has a text but no {label_field!r}; label it or remove it")
    table = table.dropna(subset=[text_field, label_field])
    if table.empty:
        raise RegmeanError(f"{path}: no rows with both {text_field!r} and {label_field!r}")
    texts, labels = table[text_field].tolist(), table[label_field].tolist()
    if token_level:
        return _tagged(path, texts, labels, text_field, label_field)
    rows = [int(i) + 1 for i in table.index]  # read as measure reads texts; rows numbered as in the file
    texts = [text_cell(t, path, text_field, row) or "" for t, row in zip(texts, rows, strict=True)]
    for y, row in zip(labels, rows, strict=True):
        if not isinstance(y, str | int) or isinstance(y, bool):
            raise RegmeanError(f"{path}: row {row}: {label_field!r} is a {type(y).__name__}; write a label name")
    names = sorted({str(y) for y in labels})
    return TextDataset(path.stem, [str(t) for t in texts], [names.index(str(y)) for y in labels], names)


def _tagged(path: Path, texts: list, labels: list, text_field: str, label_field: str) -> TextDataset:
    for i, (words, tags) in enumerate(zip(texts, labels, strict=True)):
        if not _string_list(words) or not _string_list(tags) or len(words) != len(tags):
            raise RegmeanError(
                f"{path}: row {i + 1}: {text_field!r} and {label_field!r} must be lists of strings of one length"
            )
    names = sorted({str(t) for tags in labels for t in tags})
    tag_ids = [[names.index(str(t)) for t in tags] for tags in labels]
    return TextDataset(path.stem, [list(map(str, w)) for w in texts], tag_ids, names, token_level=True)


def _string_list(value) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, str) and all(isinstance(v, str) for v in value)
