"""Fisher-weighted averaging: W = sum_i c_i F_i W_i / sum_i c_i F_i, elementwise (diagonal Fisher F_i)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from regmean.methods.average import weighted_average

EPS = 1e-30  # only breaks 0/0: a parameter no model's Fisher touches is simply averaged


class FisherOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def fisher_average(tensors: torch.Tensor, weights: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    w = weights.to(torch.float64).reshape(-1, *([1] * (tensors.dim() - 1)))
    f = fisher.to(torch.float64) * w + EPS
    return (f * tensors.to(torch.float64)).sum(0) / f.sum(0)


def merge_tensor(tensors, weights, base, options, fisher: torch.Tensor | None = None) -> torch.Tensor:
    if fisher is None:
        return weighted_average(tensors, weights)
    return fisher_average(torch.stack(list(tensors)), weights, fisher)
