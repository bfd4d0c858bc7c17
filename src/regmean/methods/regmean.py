"""RegMean for one linear layer: W^T = (sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i^T, solved without an inverse.

G~_i = alpha G_i + (1 - alpha) diag(G_i) shrinks the off-diagonal entries. The system is solved by a Cholesky
factorisation in float64; when that fails, a ridge lambda I pulling toward the weighted average is added,
lambda growing from 1e-10 x the mean diagonal until the factorisation succeeds, and lambda is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from regmean.methods.average import weighted_average

RIDGE_LADDER = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)


class RegMeanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    """Off-diagonal multiplier: 1 = plain RegMean, 0 = per-feature weighted average."""
    gram_weighting: Literal["mean", "sum"] = "mean"
    """mean: each model's Gram divided by its row count (reference code); sum: raw sums (the paper's formula)."""
    bias: Literal["average", "joint"] = "average"
    """average: biases averaged; joint: weight and bias solved together by affine least squares."""


def shrink(grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G), for a stack [..., d, d]."""
    if alpha == 1.0:
        return grams
    return alpha * grams + (1.0 - alpha) * torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))


def affine_gram(gram: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """The Gram of [x, 1]: [[sum x x^T, sum x], [sum x^T, n]]."""
    d = gram.shape[-1]
    out = gram.new_empty(d + 1, d + 1)
    out[:d, :d] = gram
    out[:d, d] = total
    out[d, :d] = total
    out[d, d] = count
    return out


def solve_spd(a: torch.Tensor, b: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Solve a x = b for symmetric positive (semi)definite a (float64). Returns x and the ridge used.

    With ridge lambda the system is (a + lambda I) x = b + lambda fallback, so directions that no data
    constrains take `fallback` (the weighted average) instead of zero.
    """
    scale = float(torch.diagonal(a).mean().abs()) or 1.0
    for step in RIDGE_LADDER:
        ridge = step * scale
        system = a
        if ridge:  # a + ridge I, without materialising I
            system = a.clone()
            system.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            x = torch.cholesky_solve(b + ridge * fallback if ridge else b, chol)
            if torch.isfinite(x).all():
                return x, ridge
    raise FloatingPointError("Gram matrix is not positive definite even with a ridge of its mean diagonal")


def regmean_solve(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    gram_scale: torch.Tensor,
    avg_weights: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, float]:
    """Merge K weight matrices (each [d_out, d_in], nn.Linear layout) with their Grams (each [d_in, d_in]).

    gram_scale [K] multiplies each Gram (model weight, divided by the row count for `mean` weighting);
    avg_weights [K] defines the fallback average. The system is accumulated one model at a time in float64, so
    memory holds the inputs plus about three d_in x d_in float64 matrices. Returns the merged [d_out, d_in]
    (float64) and the ridge used.
    """
    d_in = grams[0].shape[-1]
    a = torch.zeros(d_in, d_in, dtype=torch.float64)
    b = torch.zeros(d_in, weights[0].shape[0], dtype=torch.float64)
    for gram, weight, scale in zip(grams, weights, gram_scale.tolist(), strict=True):
        # the products run in the statistics' own precision (float32 unless measured in float64), the sums in float64
        g = gram.to(torch.promote_types(gram.dtype, torch.float32), copy=True)
        if alpha != 1.0:  # shrink in place: off-diagonal entries times alpha, diagonal kept
            diag = g.diagonal().clone()
            g.mul_(alpha).diagonal().copy_(diag)
        g.mul_(scale)
        a.add_(g)
        b.add_(g @ weight.to(g.dtype).T)
        del g
    fallback = weighted_average([w.to(torch.float64).T for w in weights], avg_weights)
    x, ridge = solve_spd(a, b, fallback)
    return x.T, ridge


def reconstruction_error(merged: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W - W_i) G_i (W - W_i)^T) / tr(W_i G_i W_i^T): output error on model i's own inputs, relative.

    Computed in the Gram's precision (float32 unless measured in float64), as sum((D G) * D)."""
    work = torch.promote_types(gram.dtype, torch.float32)
    gram = gram.to(work)
    diff = (merged.to(torch.float64) - weight.to(torch.float64)).to(work)
    weight = weight.to(work)
    num = float(((diff @ gram) * diff).sum(dtype=torch.float64))
    den = float(((weight @ gram) * weight).sum(dtype=torch.float64))
    return num / den if den > 0 else float("nan")


def merge_tensor(tensors: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None, options) -> torch.Tensor:
    """Parameters without statistics (embeddings, norms, biases by default) are averaged."""
    return weighted_average(tensors, weights)
