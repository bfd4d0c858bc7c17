"""Weighted average of K tensors: the data-free baseline, and what RegMean does to non-linear parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from regmean.methods.base import ElementwiseMethod, TensorInputs, TensorStep
from regmean.recipe_model import RecipeModel


class AverageOptions(RecipeModel):
    """Simple averaging has no options."""


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i T_i / sum_i w_i, accumulated one input at a time in at least float32 (no stacked copy).

    `tensors` is a list of same-shape tensors or a stacked tensor [K, ...]."""
    coef = (weights.to(torch.float64) / weights.to(torch.float64).sum()).tolist()
    out = tensors[0].to(torch.promote_types(tensors[0].dtype, torch.float32), copy=True).mul_(coef[0])
    for t, c in zip(tensors[1:], coef[1:], strict=True):
        out.add_(t, alpha=c)
    return out


class Average(ElementwiseMethod):
    name = "average"
    title = "simple averaging"
    options = AverageOptions
    runs_on_device = True
    merges_grown_vocabularies = True

    def merge_tensor(self, step: TensorStep, data: TensorInputs) -> torch.Tensor:
        return weighted_average(data.tensors, self.weights)
