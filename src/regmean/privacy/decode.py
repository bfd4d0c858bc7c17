"""The bag-of-words decode: the non-negative counts n that best explain a Gram, G ~ sum_a n_a u_a u_a^T.

An outsider holding the public model knows every atom u_a (one per vocabulary token, or per token and position);
the file gives G. The decode solves

    min_{n >= 0}  || sum_a n_a u_a u_a^T - G ||_F^2

to convergence by an active set: the gradient over all atoms picks the atoms that would lower the residual, a
least-squares fit on the chosen ones keeps those it gives a positive count (or, in a round after one that did
not lower the residual, an accelerated projected-gradient solve of the non-negative problem on the chosen atoms,
warm-started, then refitted exactly on the atoms it keeps), until no atom outside the set can lower the residual
and every atom in it fits exactly: the KKT conditions of the whole problem, so the answer is the optimum. The
normal matrix of atoms a, b is (u_a . u_b)^2, so nothing of size d^2 per atom is ever formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GRADIENT_CHUNK = 32768
"""Atoms whose gradient is computed at a time (a [chunk, d] product)."""
PROJECTED_ITERATIONS = 500
"""Projected-gradient iterations of a round whose quick fit stalled (each a product with the chosen atoms' M)."""


@dataclass
class Decoded:
    """The decode's answer: a non-negative count per atom, and how well it explains the Gram."""

    counts: torch.Tensor  # [atoms] float64
    rounds: int
    residual: float  # ||G - sum n u u^T||_F / ||G||_F
    violation: float  # largest relative KKT violation left over all atoms (<= tolerance when converged)
    converged: bool


def decode_counts(
    atoms: torch.Tensor,
    gram: torch.Tensor,
    *,
    tolerance: float = 1e-6,
    max_rounds: int = 100,
    log: Callable[[str], None] | None = None,
) -> Decoded:
    """Non-negative counts of `atoms` ([A, d]) whose Gram sum best matches `gram` ([d, d]); see the module doc."""
    target = gram.double()
    scale = float(torch.linalg.matrix_norm(target)) or 1.0
    norms = atoms.double().pow(2).sum(1).clamp_min(1e-30)
    active = torch.zeros(0, dtype=torch.long)
    counts = torch.zeros(0, dtype=torch.float64)
    violation, previous, left = float("inf"), float("inf"), 1.0
    for rounds in range(1, max_rounds + 1):
        chosen = atoms[active].double()
        residual = target - chosen.T @ (counts[:, None] * chosen)
        # the gradient of 0.5 ||.||^2 at atom a is -u_a^T R u_a; relative to ||u_a||^2 ||G||_F to compare atoms
        slope = _quadratic_forms(atoms, residual) / (norms * scale)
        slope[active] = 0.0
        violation = float(slope.max())
        if violation <= tolerance:
            break
        entering = torch.topk(slope, k=min(int((slope > tolerance).sum()), max(256, len(active)))).indices
        stalled = left >= previous * (1 - 1e-3)  # the quick fit could drop and take back atoms forever
        start = torch.cat([counts, torch.zeros(len(entering), dtype=torch.float64)])
        active = torch.cat([active, entering])
        chosen = atoms[active].double()
        counts = _projected_fit(chosen, target, start) if stalled else _positive_fit(chosen, target)
        active, counts = active[counts > 0], counts[counts > 0]
        previous, left = left, _residual(atoms[active].double(), counts, target) / scale
        if log is not None:
            log(f"  round {rounds}: {len(active)} atoms, largest violation {violation:.1e}")
    full = torch.zeros(atoms.shape[0], dtype=torch.float64)
    full[active] = counts
    return Decoded(full, rounds, left, violation, violation <= tolerance)


def _residual(chosen: torch.Tensor, counts: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(target - chosen.T @ (counts[:, None] * chosen)))


def _quadratic_forms(atoms: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """u_a^T M u_a for every atom (float32 products, float64 result), a chunk of atoms at a time."""
    m = matrix.float()
    out = torch.empty(atoms.shape[0], dtype=torch.float64)
    for start in range(0, atoms.shape[0], GRADIENT_CHUNK):
        chunk = atoms[start : start + GRADIENT_CHUNK].float()
        out[start : start + GRADIENT_CHUNK] = ((chunk @ m) * chunk).sum(1).double()
    return out


def _normal_system(chosen: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen atoms' least-squares problem as M, b: M_ab = (u_a . u_b)^2 and b_a = u_a^T G u_a."""
    return (chosen @ chosen.T).pow(2), ((chosen @ target) * chosen).sum(1)


def _positive_fit(chosen: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares counts of the chosen atoms, refitted without those it makes <= 0 until all are positive
    (zero for the atoms left out); the smallest ridge that factors M where atoms are dependent in Gram space."""
    counts = torch.zeros(chosen.shape[0], dtype=torch.float64)
    keep = torch.ones(chosen.shape[0], dtype=torch.bool)
    while keep.any():
        normal, rhs = _normal_system(chosen[keep], target)
        jitter = 0.0
        while True:
            factor, info = torch.linalg.cholesky_ex(normal + jitter * torch.eye(len(rhs), dtype=normal.dtype))
            if int(info) == 0:
                break
            jitter = max(jitter * 10, 1e-12 * float(normal.diagonal().mean()))
        fit = torch.cholesky_solve(rhs[:, None], factor).squeeze(1)
        if bool((fit > 0).all()):
            counts[keep] = fit
            break
        keep[keep.nonzero().squeeze(1)[fit <= 0]] = False
    return counts


def _projected_fit(chosen: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Non-negative counts of the chosen atoms by accelerated projected gradient on their normal system (FISTA,
    step 1 / the largest eigenvalue of M), warm-started from `start`, then refitted exactly on the atoms it keeps."""
    normal, rhs = _normal_system(chosen, target)
    step = 1.0 / float(torch.linalg.eigvalsh(normal)[-1])
    x, y, t = start.clone(), start.clone(), 1.0
    for _ in range(PROJECTED_ITERATIONS):
        nxt = (y - step * (normal @ y - rhs)).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y, x, t = nxt + ((t - 1) / t_next) * (nxt - x), nxt, t_next
    counts = torch.zeros_like(x)
    keep = x > 0
    counts[keep] = _positive_fit(chosen[keep], target)
    return counts
