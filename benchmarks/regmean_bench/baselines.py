"""The baselines that are not merges: output ensembling and the majority-class predictor."""

from __future__ import annotations

from collections import Counter

import torch

from regmean.io.labelled import TextDataset


def ensemble(predictions: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Output ensembling: the average of the models' logits, example by example."""
    return [torch.stack(per_model).mean(0) for per_model in zip(*predictions, strict=True)]


def constant(data: TextDataset) -> list[torch.Tensor]:
    """The logits of the majority-class predictor of `data`: the evaluation set's own most frequent label (tag) for
    every example (word). The best constant for accuracy and macro-F1; for entity F1 (all O) it scores 0."""
    flat = [y for labels in data.labels for y in labels] if data.token_level else list(data.labels)
    one_hot = torch.zeros(len(data.label_names))
    one_hot[Counter(flat).most_common(1)[0][0]] = 1.0
    if data.token_level:
        return [one_hot.expand(len(labels), -1) for labels in data.labels]
    return [one_hot for _ in data.labels]
