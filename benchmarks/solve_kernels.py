"""Can RegMean's float64 factorisation and triangular solves run nearer the GEMM rate than LAPACK's?

The regmean_floor benchmark found the Cholesky factorisation and the two triangular solves of each site running
below this machine's float64 GEMM rate (LAPACK potrf and trsm). The textbook remedy is a recursive, blocked form
whose work is mostly matrix products (half of each level's solve is one GEMM), here in place (no copies beyond the
one LAPACK makes of its input). This measures both on the shapes of a 1.1B Llama site (hidden 2048 with 2,560
stacked output rows; the MLP's 5,632-wide down projection with 2,048), one system each, best of 3, and checks
they agree.

    python benchmarks/solve_kernels.py        # prints a markdown table; docs/benchmarks/solve_kernels.md
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

BASE = 512
"""Below this width the recursive forms call LAPACK."""
SHAPES = ((2048, 2560), (5632, 2048))


def lower_solve(lower: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L X = B in place of B, recursively: X1 = L11 \\ B1, then X2 = L22 \\ (B2 - L21 X1). Reads only L's lower
    triangle."""
    n = lower.shape[0]
    if n <= BASE:
        return b.copy_(torch.linalg.solve_triangular(lower, b, upper=False))
    h = n // 2
    lower_solve(lower[:h, :h], b[:h])
    b[h:].addmm_(lower[h:, :h], b[:h], alpha=-1)
    lower_solve(lower[h:, h:], b[h:])
    return b


def upper_solve(lower: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L^T X = B in place of B, recursively from the bottom (L^T as a view: no transposed copy)."""
    n = lower.shape[0]
    if n <= BASE:
        return b.copy_(torch.linalg.solve_triangular(lower.T, b, upper=True))
    h = n // 2
    upper_solve(lower[h:, h:], b[h:])
    b[:h].addmm_(lower[h:, :h].T, b[h:], alpha=-1)
    upper_solve(lower[:h, :h], b[:h])
    return b


def cholesky(a: torch.Tensor) -> torch.Tensor:
    """A's lower Cholesky factor in place of A's lower triangle, recursively: L11 = chol(A11), L21 = A21 L11^-T,
    L22 = chol(A22 - L21 L21^T). The upper triangle is left as it was (the solves never read it)."""
    n = a.shape[0]
    if n <= BASE:
        return a.copy_(torch.linalg.cholesky(a))
    h = n // 2
    cholesky(a[:h, :h])
    lower_solve(a[:h, :h], a[h:, :h].T)  # L11 L21^T = A21^T, in place of A21
    a[h:, h:].addmm_(a[h:, :h], a[h:, :h].T, alpha=-1)
    cholesky(a[h:, h:])
    return a


def best_of(fn: Callable[[], torch.Tensor], reps: int = 3) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64; GFLOP/s in brackets\n")
    print("| width x rows | GEMM | potrf (LAPACK) | recursive Cholesky | cholesky_solve (LAPACK) | recursive solves |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, m in SHAPES:
        x = torch.randn(n, n + 64, dtype=torch.float64)
        a = x @ x.T / n + torch.eye(n, dtype=torch.float64)
        b = torch.randn(n, m, dtype=torch.float64)
        gemm, _ = best_of(lambda a=a, b=b: a @ b)
        potrf, factor = best_of(lambda a=a: torch.linalg.cholesky(a))
        mine, own_factor = best_of(lambda a=a: cholesky(a.clone()))  # the clone: a copy LAPACK makes too
        solve, x_lapack = best_of(lambda b=b, f=factor: torch.cholesky_solve(b, f))
        rec, x_rec = best_of(lambda b=b, f=factor: upper_solve(f, lower_solve(f, b.clone())))
        assert torch.allclose(own_factor.tril(), factor, atol=1e-10) and torch.allclose(x_rec, x_lapack, atol=1e-10)
        chol_flop, solve_flop = n**3 / 3, 2 * n * n * m

        def cell(seconds: float, flop: float) -> str:
            return f"{seconds:.2f} s ({flop / seconds / 1e9:.0f})"

        print(
            f"| {n} x {m} | {2 * n * n * m / gemm / 1e9:.0f} | {cell(potrf, chol_flop)} | {cell(mine, chol_flop)} "
            f"| {cell(solve, solve_flop)} | {cell(rec, solve_flop)} |"
        )


if __name__ == "__main__":
    main()
