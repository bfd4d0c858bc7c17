"""RegMean's least squares for the linear layers that read one site, and its diagnostics (pure functions).

The merged weight solves (sum_i c_i G~_i) W^T = sum_i c_i G~_i W_i^T, with G~_i = alpha G_i + (1 - alpha) diag(G_i).
It is solved for its deviation from the weighted average W_avg: with D_i = W_i - W_avg,

    A E = R,   A = sum_i c_i G~_i,   R = sum_i c_i G~_i D_i^T,   W = W_avg + E^T,

which is the same system (A W_avg^T cancels), but the products G~_i D_i^T are of the fine-tunes' differences, far
smaller than the weights themselves, and a ridge (added only when A is singular) pulls unconstrained directions to
the weighted average. Everything runs in float64 on the tensors' device: the Grams are converted exactly, the
products and the Cholesky factorisation are float64, so the result is within about 1e-9 (relative) of the exact
optimum even where A's condition number is 1e8 (a Gram of rank at most its example count). No inverse is formed.

Diagnostics: each model's relative reconstruction error tr((W - W_i) G_i (W - W_i)^T) / tr(W_i G_i W_i^T), and
the system's relative residual, computed on a seeded sample of output rows (a few percent of the merge's
arithmetic) with the estimate's standard error, or on every row on request.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from regmean.io.untrusted import all_finite
from regmean.methods.average import weighted_average

RIDGE_LADDER = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)
PSD_SLACK_PER_WIDTH = 64 * 2.0**-24
"""How far below zero an eigenvalue of a Gram scaled to unit diagonal may lie and still be rounding, per unit of
its width: float32 sums of d-wide products are off by about d float32 epsilons (in units of the diagonal)."""
SAMPLED_FRACTION = 0.01
"""Share of a layer's output rows its diagnostics are estimated on (at least MIN_SAMPLED_ROWS)."""
MIN_SAMPLED_ROWS = 16


def affine_gram(gram: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """The Gram of [x, 1]: [[sum x x^T, sum x], [sum x^T, n]]."""
    d = gram.shape[-1]
    out = gram.new_empty(d + 1, d + 1)
    out[:d, :d] = gram
    out[:d, d] = total
    out[d, :d] = total
    out[d, d] = count
    return out


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Solve (a + ridge I) x = b for symmetric positive (semi)definite a (float64) by Cholesky, with the smallest
    ridge of RIDGE_LADDER (times a's mean diagonal) that factorises: directions no data constrains get x = 0.
    Returns x, the ridge and the Cholesky factor of a + ridge I."""
    scale = float(torch.diagonal(a).mean().abs()) or 1.0
    for step in RIDGE_LADDER:
        ridge = step * scale
        system = a
        if ridge:  # a + ridge I, without materialising I
            system = a.clone()
            system.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            x = torch.cholesky_solve(b, chol)
            if all_finite(x):
                return x, ridge, chol
    raise FloatingPointError("Gram matrix is not positive definite even with a ridge of its mean diagonal")


class IndefiniteGram(FloatingPointError):
    """Model `index`'s Gram is not positive semidefinite beyond rounding: no data has it as its sum of outer
    products."""

    def __init__(self, index: int):
        super().__init__(f"the Gram of model {index} is not positive semidefinite")
        self.index = index


def is_semidefinite(gram: torch.Tensor) -> bool:
    """Whether a symmetric float64 `gram` is positive semidefinite up to rounding: one Cholesky factorisation of
    it scaled to near-unit diagonal (by powers of two: exact barring underflow, and undone), PSD_SLACK_PER_WIDTH x
    width added to the diagonal. Works in place and restores `gram`; reads its lower triangle."""
    diagonal = gram.diagonal().clone()
    if bool((diagonal < 0).any()):
        return False
    exponent = torch.frexp(diagonal.clamp_min(torch.finfo(torch.float64).tiny))[1]
    scale = torch.ldexp(torch.ones_like(diagonal), -torch.div(exponent, 2, rounding_mode="floor"))
    gram.mul_(scale[:, None]).mul_(scale[None, :])
    gram.diagonal().add_(PSD_SLACK_PER_WIDTH * gram.shape[0])
    info = torch.linalg.cholesky_ex(gram).info
    gram.div_(scale[:, None]).div_(scale[None, :])
    gram.diagonal().copy_(diagonal)
    return int(info) == 0


@dataclass(frozen=True)
class Solution:
    merged: torch.Tensor
    """[d_out, d_in], float64."""
    ridge: float
    system: torch.Tensor
    """A = sum_i c_i G~_i, float64 (kept for the residual)."""
    rhs: torch.Tensor
    """R = sum_i c_i G~_i D_i^T, float64."""
    deviation: torch.Tensor
    """E, the solution of (A + ridge I) E = R: merged = average + E^T."""
    factor: torch.Tensor
    """The Cholesky factor of A + ridge I: the metric the merged weight is optimal in."""

    def residual(self, rows: torch.Tensor | None = None) -> float:
        """||(A + ridge I) E - R|| / ||R|| (Frobenius) over output `rows` (all if None); 0 when R is 0 (every
        model the same)."""
        if rows is not None:
            rows = rows.to(self.deviation.device)
        x, b = (self.deviation, self.rhs) if rows is None else (self.deviation[:, rows], self.rhs[:, rows])
        norm = float(torch.linalg.vector_norm(b))
        if norm == 0:
            return 0.0
        return float(torch.linalg.vector_norm(self.system @ x + self.ridge * x - b)) / norm


def regmean_solve(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    gram_scale: torch.Tensor,
    avg_weights: torch.Tensor,
    alpha: float,
    verify: bool | Sequence[bool] = False,
) -> Solution:
    """Merge K weight matrices (each [d_out, d_in], nn.Linear layout) with their Grams (each [d_in, d_in]).

    gram_scale [K] multiplies each Gram (model weight, divided by the row count for `mean` weighting);
    avg_weights [K] defines the weighted average the solve starts from. One model at a time: memory holds the
    inputs plus three d_in x d_in float64 matrices (one Gram being added, the system, its factor) and the
    weight-sized ones the plan counts. With `verify` (for every Gram, or per Gram), each Gram is first proven
    positive semidefinite (`is_semidefinite`, one factorisation each): IndefiniteGram names the first that is not.
    """
    verify = [verify] * len(grams) if isinstance(verify, bool) else list(verify)
    average = weighted_average([w.to(torch.float64) for w in weights], avg_weights)
    delta = torch.empty_like(average)
    a = rhs = None
    for index, (gram, weight, scale) in enumerate(zip(grams, weights, gram_scale.tolist(), strict=True)):
        g = gram.to(torch.float64, copy=True)  # becomes scale * G~, in two passes over it
        if verify[index] and not is_semidefinite(g):
            raise IndefiniteGram(index)
        diag = torch.diagonal(g).clone().mul_(scale)
        torch.diagonal(g.mul_(alpha * scale)).copy_(diag)
        torch.sub(weight, average, out=delta)
        if a is None:  # the first model's terms start the sums (no zero-filled matrices)
            a, rhs = g, g @ delta.T
        else:
            a.add_(g)
            rhs.addmm_(g, delta.T)
        del g
    deviation, ridge, factor = solve_spd(a, rhs)
    return Solution(average + deviation.T, ridge, a, rhs, deviation, factor)


def check_rows(d_out: int, name: str, exact: bool) -> torch.Tensor | None:
    """The output rows a layer's diagnostics are computed on: all (None) when exact or when the sample would be
    all, else a sample of SAMPLED_FRACTION (at least MIN_SAMPLED_ROWS), seeded by the layer's name."""
    m = max(MIN_SAMPLED_ROWS, math.ceil(SAMPLED_FRACTION * d_out))
    if exact or m >= d_out:
        return None
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randperm(d_out, generator=generator)[:m].sort().values


@dataclass(frozen=True)
class ErrorEstimate:
    value: float | None
    """None where model i's outputs are all zero on its own inputs (a site whose inputs are zero): no relative
    error is defined."""
    stderr: float
    """Standard error of `value` as an estimate from sampled rows (0 when every row was used)."""


def reconstruction_error(
    merged: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor | None = None
) -> ErrorEstimate:
    """tr((W - W_i) G_i (W - W_i)^T) / tr(W_i G_i W_i^T): the output error on model i's own inputs, relative; in
    float64. With `rows`, the ratio of the sums over those output rows, with its standard error (ratio estimator,
    sampling without replacement from the layer's rows)."""
    gram = gram.to(torch.float64)
    own = weight.to(torch.float64)
    if rows is not None:
        merged, own = merged[rows.to(merged.device)], own[rows.to(own.device)]
    diff = merged.to(torch.float64) - own
    num = ((diff @ gram) * diff).sum(1)
    den = ((own @ gram) * own).sum(1)
    total = float(den.sum())
    if total <= 0:
        return ErrorEstimate(None, 0.0)
    ratio = float(num.sum()) / total
    if rows is None or len(rows) < 2:
        return ErrorEstimate(ratio, 0.0)
    m, n = len(rows), weight.shape[0]
    spread = float((num - ratio * den).var())
    return ErrorEstimate(ratio, math.sqrt(max(0.0, 1 - m / n) * spread / m) / (total / m))
