"""Merge methods behind a registry: each is an options model plus pure functions over stacked tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from regmean.methods import average, fisher, regmean, task_arithmetic


@dataclass(frozen=True)
class Method:
    name: str
    options: type[BaseModel]
    merge_tensor: Callable
    """(K tensors (a list or stacked [K, ...]), weights [K], base or None, options) -> merged tensor, for every
    non-RegMean tensor."""
    needs_base: bool = False
    statistics: str | None = None
    """The statistics file each model needs: "gram" (regmean measure) or "fisher"."""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("regmean", regmean.RegMeanOptions, regmean.merge_tensor, statistics="gram"),
        Method("fisher", fisher.FisherOptions, fisher.merge_tensor, statistics="fisher"),
        Method("average", average.AverageOptions, average.merge_tensor),
        Method("task_arithmetic", task_arithmetic.TaskArithmeticOptions, task_arithmetic.merge_tensor, needs_base=True),
    )
}
