"""Task arithmetic: the base model plus a scaled sum of task vectors (W_i - W_base)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from regmean.methods.average import weighted_average


class TaskArithmeticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scaling: float = 1.0
    """lambda in W_base + lambda * sum_i w_i (W_i - W_base)."""


def task_arithmetic(tensors: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, scaling: float) -> torch.Tensor:
    work = torch.promote_types(tensors.dtype, torch.float32)
    base = base.to(work)
    deltas = tensors.to(work) - base
    return base + scaling * torch.tensordot(weights.to(work), deltas, dims=1)


def merge_tensor(
    tensors: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None, options: TaskArithmeticOptions
) -> torch.Tensor:
    if base is None:  # a tensor the base model lacks (a fine-tuned head): nothing to add task vectors to
        return weighted_average(tensors, weights)
    return task_arithmetic(tensors, weights, base, options.scaling)
