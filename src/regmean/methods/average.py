"""Weighted average of K tensors: the data-free baseline, and what RegMean does to non-linear parameters."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict


class AverageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def weighted_average(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i T_i / sum_i w_i over the first dimension, computed in at least float32."""
    work = torch.promote_types(tensors.dtype, torch.float32)
    w = weights.to(work)
    return torch.tensordot(w / w.sum(), tensors.to(work), dims=1)


def merge_tensor(tensors: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None, options) -> torch.Tensor:
    return weighted_average(tensors, weights)
