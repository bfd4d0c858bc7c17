"""TIES-merging (Yadav et al., 2023): trim each task vector to its largest entries, elect each entry's sign by
total mass, and average the entries that agree with it.

    tau_i    = W_i - W_base, with its entries below the k-th largest magnitude set to 0 (k = ceil(density x n))
    sign     = sign(sum_i w_i tau_i)
    W        = W_base + scaling x sum_i w_i tau_i [sign(tau_i) = sign] / sum_i w_i [sign(tau_i) = sign]

Trimming is per tensor and exact for the whole tensor even when a large tensor is merged a block of rows at a time:
the threshold is then found by a two-pass radix select over the magnitudes' float32 bit patterns (two histograms,
never the whole tensor in memory). Magnitudes are compared in float32 in both cases; ties at the threshold are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from pydantic import Field

from regmean.dtypes import itemsize
from regmean.methods.base import TensorInputs, TensorStep
from regmean.methods.task_arithmetic import TaskVectorMethod
from regmean.recipe_model import RecipeModel


class TiesOptions(RecipeModel):
    density: float = Field(0.2, gt=0.0, le=1.0)
    """Fraction of each task vector's entries kept (those of largest magnitude), per tensor."""
    scaling: float = 1.0
    """lambda in W_base + lambda * (merged task vector)."""


def keep_count(numel: int, density: float) -> int:
    """Entries kept of `numel`: ceil(density x numel), at least one (rounded first: 0.07 x 100 is 7, not 8)."""
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tensor - base in the wider of their dtypes, at least float32."""
    work = torch.promote_types(torch.promote_types(tensor.dtype, base.dtype), torch.float32)
    return tensor.to(work) - base.to(work)


def magnitudes(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|tensor - base| in float32: the values trimming compares."""
    return task_vector(tensor, base).abs_().to(torch.float32)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry of `values` (held whole)."""
    return float(torch.kthvalue(values.reshape(-1), values.numel() - k + 1).values)


def kth_largest_streamed(pieces: Callable[[], Iterator[list[torch.Tensor]]], ks: list[int]) -> list[float]:
    """For each of several streams of non-negative float32 values, its k-th largest (its own k of `ks`). `pieces()`
    (called twice) yields one piece of every stream at a time (so a shared input, such as the base model's block, is
    read once).

    Non-negative float32 values order as their bit patterns do, so the k-th largest is found by a histogram of the
    high 16 bits (which bucket holds it) and then one of the low 16 bits within that bucket: exact, with memory for
    two histograms of 2^16 counts per stream."""
    high: list[torch.Tensor] = []
    for group in pieces():
        counts = [torch.bincount(p.reshape(-1).view(torch.int32) >> 16, minlength=1 << 16) for p in group]
        high = counts if not high else [h + c for h, c in zip(high, counts, strict=True)]
    found = [_from_the_top(h, k) for h, k in zip(high, ks, strict=True)]
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in high]
    for group in pieces():
        for histogram, piece, (bucket, _) in zip(low, group, found, strict=True):
            bits = piece.reshape(-1).view(torch.int32)
            histogram += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    out = []
    for histogram, (bucket, rank) in zip(low, found, strict=True):
        rest, _ = _from_the_top(histogram, rank)
        out.append(float(torch.tensor([(bucket << 16) | rest], dtype=torch.int32).view(torch.float32)))
    return out


def _from_the_top(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and that value's rank within the bin."""
    above = histogram.flip(0).cumsum(0)
    i = int(torch.searchsorted(above, torch.tensor(k)))
    return len(histogram) - 1 - i, k - (int(above[i - 1]) if i else 0)


def elect_and_average(task_vectors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Sign election by total (weighted) mass, then the weighted mean of the entries that agree with it (0 where
    none does)."""
    w = weights.to(torch.float64).tolist()
    total = sum(wi * tv for wi, tv in zip(w, task_vectors, strict=True))
    elected = torch.sign(total)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for wi, tv in zip(w, task_vectors, strict=True):
        agree = (torch.sign(tv) == elected) & (tv != 0)
        num += torch.where(agree, wi * tv, 0.0)
        den += agree * wi
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


@dataclass
class TiesInputs(TensorInputs):
    thresholds: list[float] | None = None
    """Each model's trimming threshold for the whole tensor."""


class Ties(TaskVectorMethod):
    name = "ties"
    title = "TIES-merging"
    citations = (
        "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708).",
    )
    options = TiesOptions
    per_model_options = frozenset({"density"})

    def __init__(self, inputs, device: str = "cpu"):
        super().__init__(inputs, device)
        self._thresholds: dict[str, list[float]] = {}
        """The current blocked tensor's thresholds, found when its first block is loaded."""

    def tensor_steps(self, key: str) -> list[TensorStep]:
        """As for any elementwise method; a tensor merged by blocks is read twice more, whole, for its thresholds
        (counted on its first block)."""
        steps = super().tensor_steps(key)
        if len(steps) == 1:
            return steps
        first = self.inputs.models[0]
        extra = 2 * (len(self.inputs.models) + 1) * math.prod(first.shapes[key]) * itemsize(first.dtype(key))
        cost = steps[0].cost
        steps[0] = replace(steps[0], cost=replace(cost, streamed_bytes=extra))
        return steps

    def load(self, step: TensorStep) -> TiesInputs:
        data = super().load(step)
        thresholds = None
        if data.base is not None and data.tensors[0].is_floating_point() and not self.from_base(step.key):
            thresholds = self.thresholds(step, data)
        return TiesInputs(data.tensors, data.base, data.base_missing, thresholds=thresholds)

    def thresholds(self, step: TensorStep, data: TensorInputs) -> list[float]:
        """Each model's k-th largest task-vector magnitude over the whole tensor (read again, by blocks, when the
        step holds only a block of it)."""
        inputs, key = self.inputs, step.key
        numel = math.prod(inputs.models[0].shapes[key])
        if numel == 0:
            return [0.0] * len(data.tensors)
        ks = [keep_count(numel, own.density) for own in self.model_settings]
        if step.rows is None:
            return [kth_largest(magnitudes(t, data.base), k) for t, k in zip(data.tensors, ks, strict=True)]
        if key not in self._thresholds:
            blocks = [s.rows for s in self.tensor_steps(key)]
            base_name = inputs.base_key(key)

            def pieces():
                for rows in blocks:
                    base = inputs.base.get(base_name, rows)
                    yield [magnitudes(model.get(key, rows), base) for model in inputs.models]

            self._thresholds = {key: kth_largest_streamed(pieces, ks)}
        return self._thresholds[key]

    def merge_task_vectors(self, step: TensorStep, data: TiesInputs) -> torch.Tensor:
        trimmed = []
        for t, threshold in zip(data.tensors, data.thresholds, strict=True):
            tv = task_vector(t, data.base)
            trimmed.append(torch.where(tv.abs().to(torch.float32) >= threshold, tv, 0.0))
        merged = elect_and_average(trimmed, self.weights)
        return data.base.to(merged.dtype) + self.settings.scaling * merged
