"""Gram kernels: is there a faster exact way to sum x x^T than ours?

    python benchmarks/gram_kernels.py [--threads 1]

Times gram += X^T X for the widths of MiniLM-L6's sites (384, 1536) and SmolLM2-135M's (576, 1536) on row counts
of one measuring batch, three ways: one full `addmm` (what most RegMean code does), our `add_gram` (blocks on and
above the diagonal for widths >= 1024), and the BLAS symmetric rank-k update `ssyrk` (upper triangle only; from
SciPy's OpenBLAS, since torch does not expose it). Median of 15, float32, the three interleaved.
Writes docs/benchmarks/gram_kernels.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.linalg.blas import ssyrk
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_doc  # noqa: E402

from regmean.measure.accumulate import add_gram  # noqa: E402

REPEATS = 15


def kernels(x: torch.Tensor) -> dict[str, Callable[[], None]]:
    d = x.shape[1]
    full, ours = torch.zeros(d, d), torch.zeros(d, d)
    upper = np.zeros((d, d), dtype=np.float32, order="F")
    a = x.numpy().T  # d x n, Fortran-ordered view of the same memory

    def syrk() -> None:
        ssyrk(1.0, a, beta=1.0, c=upper, lower=0, overwrite_c=1)

    return {"addmm": lambda: full.addmm_(x.T, x), "ours": lambda: add_gram(ours, x), "ssyrk": syrk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with threadpool_limits(args.threads):
        for d in (384, 576, 1536):
            for n in (512, 2048):
                x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
                fns = kernels(x)
                for fn in fns.values():  # warm up
                    fn()
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(REPEATS):
                    for k, fn in fns.items():
                        t = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t)
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append({"d": d, "n": n, **{f"{k}_ms": v * 1e3 for k, v in med.items()}})
                print(rows[-1], flush=True)
    lines = [
        "# Gram kernels",
        "",
        f"gram += X^T X for X of n rows and width d, float32, {args.threads} thread(s), median of {REPEATS}; "
        f"milliseconds. Machine: {machine()}.",
        "",
        "| d | n | full addmm | ours (add_gram) | BLAS ssyrk (upper) | ours / addmm | ssyrk / ours |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['n']} | {r['addmm_ms']:.2f} | {r['ours_ms']:.2f} | {r['ssyrk_ms']:.2f} "
            f"| {r['ours_ms'] / r['addmm_ms']:.2f} | {r['ssyrk_ms'] / r['ours_ms']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_doc("gram_kernels", text, {"rows": rows, "threads": args.threads})


if __name__ == "__main__":
    main()
