"""Write a merge as one peft LoRA adapter, one merged tensor at a time (the merge's steps in, adapter tensors out).

Each changed linear weight W of the merge becomes B A, the rank-r update closest to Delta = W - W_base in the
merge's own metric: for a RegMean layer, its system S = sum_i c_i G~_i (+ ridge), whose solution W minimises
tr((W' - W) S (W' - W)^T) over every W'; so the best rank-r W_base + B A minimises ||(Delta - B A) L||_F with
S = L L^T (Cholesky), and is the truncated SVD of Delta L mapped back by a triangular solve (no inverse). A layer
without a metric (data-free methods, averaged layers) gets the plain truncated SVD of Delta. The scale is 1
(lora_alpha = r), and sqrt(s) goes to each factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from regmean.io.adapter import ADAPTER_WEIGHTS
from regmean.io.checkpoint import SAFETENSORS_SINGLE
from regmean.io.writer import Layout, ShardedWriter
from regmean.merge.lora_plan import AdapterPlan
from regmean.methods.base import OutputNote


@dataclass(frozen=True)
class LowRank:
    b: torch.Tensor
    """[d_out, r]"""
    a: torch.Tensor
    """[r, d_in]"""
    lost: float
    """||(Delta - B A) L||_F^2 (L = I without a metric)."""
    total: float
    """||Delta L||_F^2."""


def low_rank_update(delta: torch.Tensor, rank: int, factor: torch.Tensor | None = None) -> LowRank:
    """The rank-`rank` B A closest to `delta` [d_out, d_in] in the metric L L^T (`factor`, lower triangular
    [d_in, d_in]; None: the Frobenius norm), in float64."""
    delta = delta.to(torch.float64)
    weighted = delta if factor is None else delta @ factor.to(torch.float64)
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    if factor is not None:  # A L = a: L^T A^T = a^T, a triangular solve
        a = torch.linalg.solve_triangular(factor.to(torch.float64).T, a.T, upper=True).T
    energy = s.square()
    return LowRank(b, a, float(energy[r:].sum()), float(energy.sum()))


class LoraWriter:
    """A ShardedWriter's interface over one adapter folder: `add` takes the merge's tensors by checkpoint key and
    writes what the adapter holds of them; writers of one merge (heads: keep) share `factors` (each weight is
    factored once)."""

    def __init__(self, folder: Path, layout: Layout, plan: AdapterPlan, factors: dict, create: bool = True):
        self.plan = plan
        self.factors = factors
        self.layout = layout
        self.shards = ShardedWriter(folder, layout, max_shard_bytes=2**62, create=create)  # peft reads one file

    def add(
        self, name: str, tensor: torch.Tensor, first_row: int | None = None, metric: torch.Tensor | None = None
    ) -> OutputNote | None:
        """Write what the adapter holds of merged tensor `name` (rows from `first_row`); `metric` is the Cholesky
        factor of the layer's system, where the method solved it. Returns what the factoring lost, or how far a
        tensor left at the base's moved."""
        plan = self.plan
        if name in plan.targets:
            return self._add_target(name, tensor, metric)
        if name in plan.biases:
            target = plan.biases[name]
            delta = tensor.to(torch.float64) - plan.base.get(target.bias_base_key).to(torch.float64)
            self.shards.add(f"{target.prefix}.lora_B.bias", delta.to(plan.dtype))
        elif name in plan.saved:
            self.shards.add(plan.saved[name], tensor.to(self.layout[plan.saved[name]][0]), first_row)
        elif name in plan.kept_base:
            rows = None if first_row is None else (first_row, first_row + tensor.shape[0])
            base = plan.base.get(plan.kept_base[name], rows).to(torch.float64)
            moved = float((tensor.to(torch.float64) - base).square().sum())
            return OutputNote(name, "kept base", 0, moved, float(base.square().sum()))
        return None

    def _add_target(self, name: str, tensor: torch.Tensor, metric: torch.Tensor | None) -> OutputNote:
        target, plan = self.plan.targets[name], self.plan
        if self.factors.get("key") != name:
            merged = tensor.T if target.layer.transposed else tensor
            base = plan.base.get(target.base_key)
            base = base.T if target.layer.transposed else base
            delta = merged.to(torch.float64) - base.to(torch.float64)
            self.factors.clear()
            self.factors.update(key=name, update=low_rank_update(delta, target.rank, metric))
        update: LowRank = self.factors["update"]
        self.shards.add(f"{target.prefix}.lora_A.weight", update.a.to(plan.dtype).contiguous())
        self.shards.add(f"{target.prefix}.lora_B.weight", update.b.to(plan.dtype).contiguous())
        kind = "lora" if metric is None else "lora (system metric)"
        return OutputNote(target.layer.module, kind, target.rank, update.lost, update.total)

    def written(self) -> list[dict[str, int]]:
        return self.shards.written()

    def add_written(self, counts: list[dict[str, int]]) -> None:
        self.shards.add_written(counts)

    def close(self) -> None:
        self.shards.close()

    def finish(self) -> list[Path]:
        """The single shard, named as peft names an adapter's weights."""
        (path,) = self.shards.finish()
        final = path.with_name(ADAPTER_WEIGHTS)
        if path.name == SAFETENSORS_SINGLE:
            path.rename(final)
        return [final]
