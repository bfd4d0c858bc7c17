"""What a merge will read, write and hold in memory, said before the work (and `regmean merge --dry-run`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from regmean import distributed
from regmean.dtypes import STORED, itemsize
from regmean.errors import RegmeanError
from regmean.io.writer import Layout, layout_bytes
from regmean.memory import current_rss
from regmean.merge.inputs import MergeInputs
from regmean.methods.base import MergeMethod, Step
from regmean.units import human

if TYPE_CHECKING:
    from regmean.merge.forms import ModelFolders


@dataclass
class MergePlan:
    tensors: int
    steps: int
    note: str
    """What the method says about its work (e.g. how many layers it solves from statistics)."""
    read_bytes: int
    flops: float
    """Floating-point operations of all steps (for dividing the work among processes, and the floor it sets)."""
    write_bytes: int
    working_bytes: int
    """The largest step's working set (e.g. one site's K Grams and its layers' K weights in float64)."""
    prefetch_bytes: int
    """The largest step's inputs as loaded, which the reader thread holds while the previous step computes."""
    runtime_bytes: int
    device: str = "cpu"
    processes: int = 1
    """Processes of this merge on this host (torchrun's LOCAL_WORLD_SIZE): each holds its own peak_bytes."""

    @property
    def on_device(self) -> bool:
        return torch.device(self.device).type != "cpu"

    @property
    def peak_bytes(self) -> int:
        """Host memory: with a device, the steps compute there, and the host holds a step's raw inputs and their
        pinned copies."""
        if self.on_device:
            return self.runtime_bytes + 2 * self.prefetch_bytes
        return self.runtime_bytes + self.prefetch_bytes + self.working_bytes

    @property
    def host_bytes(self) -> int:
        """Host memory of every process of the merge on this host."""
        return self.processes * self.peak_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory: the largest step's working set and the next step's inputs, staged there."""
        return self.working_bytes + self.prefetch_bytes if self.on_device else 0

    def describe(self) -> str:
        return (
            f"plan: {self.tensors} tensors in {self.steps} steps{f' ({self.note})' if self.note else ''}; "
            f"read {human(self.read_bytes)}, write {human(self.write_bytes)}, "
            f"{self.flops / 1e9:.3g} GFLOP; peak memory about {human(self.peak_bytes)} "
            f"(runtime {human(self.runtime_bytes)} + largest step {human(self.working_bytes)} "
            f"+ next step's inputs {human(self.prefetch_bytes)})"
            + (
                f" per process, {human(self.host_bytes)} for the {self.processes} on this host"
                if self.processes > 1
                else ""
            )
            + (f"; on {self.device}: about {human(self.device_bytes)}" if self.on_device else "")
        )


@dataclass(frozen=True)
class Planned:
    """A merge ready to run: the method bound to its inputs, its steps, the output's form and the plan said of it."""

    plan: MergePlan
    method: MergeMethod
    steps: list[Step]
    form: ModelFolders


def make_plan(
    inputs: MergeInputs, method: MergeMethod, steps: list[Step], layouts: list[Layout], device: str = "cpu"
) -> MergePlan:
    """Totals over the method's steps, plus the heads that every output folder copies from its own model."""
    return MergePlan(
        tensors=len({name for step in steps for name in step.outputs}),
        steps=len(steps),
        note=method.describe(steps),
        read_bytes=head_bytes(inputs) + sum(step.cost.read_bytes + step.cost.streamed_bytes for step in steps),
        flops=sum(step.cost.flops for step in steps),
        write_bytes=sum(layout_bytes(layout) for layout in layouts),
        working_bytes=max((step.cost.working_bytes for step in steps), default=0),
        prefetch_bytes=max((step.cost.read_bytes + step.cost.unpacked_bytes for step in steps), default=0),
        runtime_bytes=current_rss(),
        device=device,
        processes=distributed.local_world_size(),
    )


def head_bytes(inputs: MergeInputs) -> int:
    """What copying every model's own head reads (heads: keep), outside the method's steps."""
    first = inputs.models[0]
    return len(inputs.models) * sum(math.prod(first.shapes[k]) * itemsize(first.dtype(k)) for k in inputs.head_keys())


def output_layouts(inputs: MergeInputs) -> list[Layout]:
    """Names, dtypes and shapes of every output folder's tensors, known before any tensor is read."""
    config, first = inputs.config, inputs.models[0]

    def entry(model, key: str, merged: bool) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype = STORED[model.dtype(key)]
        if merged and dtype.is_floating_point:
            dtype = config.output_dtype(dtype)
        return dtype, model.shapes[key]

    body = {key: (entry(first, key, True)[0], inputs.output_shape(key)) for key in inputs.body_keys()}
    outputs = inputs.models if config.heads == "keep" else inputs.models[:1]
    return [{**body, **{key: entry(m, key, False) for key in inputs.head_keys()}} for m in outputs]


def check_memory(plan: MergePlan, max_memory: int | None) -> None:
    """--max-memory applies to the host (every process of the merge on it together) and to each compute device."""
    if max_memory is not None and plan.device_bytes > max_memory:
        raise RegmeanError(
            f"estimated peak memory on {plan.device} {human(plan.device_bytes)} exceeds --max-memory "
            f"{human(max_memory)}; raise the limit or merge on a device with more memory"
        )
    if max_memory is not None and plan.host_bytes > max_memory:
        processes = f" for {plan.processes} processes on this host" if plan.processes > 1 else ""
        raise RegmeanError(
            f"estimated peak memory {human(plan.host_bytes)}{processes} exceeds --max-memory {human(max_memory)} "
            f"(largest step {human(plan.working_bytes)}, next step's inputs {human(plan.prefetch_bytes)}); "
            "raise the limit or merge on a machine with more memory"
        )


def check_resident(resident_bytes: int, max_memory: int | None) -> None:
    """Refuse, before the method loads it, what the method holds through the whole merge if it alone would exceed
    the limit (with what this process holds already)."""
    if max_memory is not None and resident_bytes and current_rss() + resident_bytes > max_memory:
        raise RegmeanError(
            f"the method holds {human(resident_bytes)} through the merge (a working model), "
            f"{human(current_rss() + resident_bytes)} with this process's own: more than --max-memory "
            f"{human(max_memory)}; raise the limit or merge on a machine with more memory"
        )
