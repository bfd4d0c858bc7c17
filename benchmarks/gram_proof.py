"""What proving each Gram positive semidefinite costs RegMean's solve (the `verify_grams` option, on by default).

The proof is one float64 Cholesky factorisation per model and site (`least_squares.is_semidefinite`); the solve
itself forms K products G_i D_i^T, factorises the summed system and solves it. Measured here on the four sites of
one layer of a 1.1B Llama (hidden 2048, MLP 5632; q/k/v stacked with 2,560 output rows, gate/up with 11,264),
two models, best of 3, the whole `regmean_solve` with the proof and without; the layer's total is the sum over its
sites, the ratio is how much longer a merge's solves take with the proof.

    python benchmarks/gram_proof.py        # prints a markdown table; docs/benchmarks/gram_proof.md
"""

from __future__ import annotations

import time

import torch

from regmean.methods.least_squares import regmean_solve

MODELS = 2
SITES = (("q, k, v", 2048, 2560), ("o", 2048, 2048), ("gate, up", 2048, 11264), ("down", 5632, 2048))


def seconds(weights, grams, verify: bool, reps: int = 3) -> float:
    ones = torch.ones(MODELS, dtype=torch.float64)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        regmean_solve(weights, grams, ones, ones, 0.9, verify=verify)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, {MODELS} models\n")
    print("| site | width x rows | solve | solve + proof | added |")
    print("|---|---|---:|---:|---:|")
    total_plain = total_proof = 0.0
    for name, d_in, d_out in SITES:
        grams = []
        for _ in range(MODELS):
            x = torch.randn(d_in + 256, d_in)
            grams.append((x.T @ x).float())  # float32, as statistics files store them
        weights = [torch.randn(d_out, d_in) for _ in range(MODELS)]
        plain, proof = seconds(weights, grams, False), seconds(weights, grams, True)
        total_plain, total_proof = total_plain + plain, total_proof + proof
        print(f"| {name} | {d_in} x {d_out} | {plain:.2f} s | {proof:.2f} s | {proof / plain - 1:+.0%} |")
    print(f"| one layer | | {total_plain:.2f} s | {total_proof:.2f} s | {total_proof / total_plain - 1:+.0%} |")


if __name__ == "__main__":
    main()
