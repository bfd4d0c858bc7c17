"""What a merge will read, write and hold in memory, said before the work (and `regmean merge --dry-run`)."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from regmean.errors import RegmeanError
from regmean.io.writer import Layout, layout_bytes
from regmean.merge.inputs import MergeInputs
from regmean.units import human

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def current_rss() -> int:
    """This process's resident memory now (libraries loaded, inputs opened): the floor under any estimate.

    Linux: VmRSS of /proc/self/status. Elsewhere the peak from getrusage (on Linux that value is inherited across
    fork and exec, so a process started by a large parent would report the parent's peak)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


BLOCK_BYTES = 16 * 1024**2
"""Plain tensors larger than this (per input) are merged a block of rows at a time, read and written in place."""


def row_blocks(shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int]] | None:
    """The [start, stop) row blocks a large tensor is merged in, or None to merge it whole."""
    size = math.prod(shape) * itemsize
    if size <= BLOCK_BYTES or len(shape) < 2:
        return None
    step = max(1, BLOCK_BYTES // (size // shape[0]))
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def _largest_block(shape: tuple[int, ...], itemsize: int) -> int:
    """Elements of the largest piece a plain tensor is merged in."""
    blocks = row_blocks(shape, itemsize)
    if blocks is None:
        return math.prod(shape)
    return (blocks[0][1] - blocks[0][0]) * math.prod(shape[1:])


@dataclass
class MergePlan:
    tensors: int
    regmean_layers: int
    read_bytes: int
    write_bytes: int
    working_bytes: int
    """The largest per-step working set: one site's K Grams and its layers' K weights (float64), or one tensor."""
    prefetch_bytes: int
    """The largest step's raw inputs, which the reader thread loads while the previous step computes."""
    runtime_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.runtime_bytes + self.prefetch_bytes + self.working_bytes

    def describe(self) -> str:
        return (
            f"plan: {self.tensors} tensors ({self.regmean_layers} RegMean layers); read {human(self.read_bytes)}, "
            f"write {human(self.write_bytes)}; peak memory about {human(self.peak_bytes)} "
            f"(runtime {human(self.runtime_bytes)} + largest step {human(self.working_bytes)} "
            f"+ next step's inputs {human(self.prefetch_bytes)})"
        )


def make_plan(inputs: MergeInputs, groups: dict, layouts: list[Layout]) -> MergePlan:
    k = len(inputs.models)
    first = inputs.models[0]
    numel = {key: math.prod(first.shapes[key]) for key in first.keys()}
    size = {key: numel[key] * DTYPE_BYTES.get(first.dtype(key), 4) for key in first.keys()}
    keys = inputs.body_keys()
    read = k * sum(size.values()) + (sum(size[key] for key in keys) if inputs.base else 0)
    read += sum(st.nbytes for st in inputs.stats) if inputs.stats else 0
    # one plain tensor (or row block): K inputs and the base's, stacked, promoted to float32 or wider, the result
    itemsize = {key: DTYPE_BYTES.get(first.dtype(key), 4) for key in keys}
    block = {key: _largest_block(first.shapes[key], itemsize[key]) for key in keys}
    working = max((8 * (k + 2) * block[key] for key in keys), default=0)
    # blocked tensors are read inside their step, so only whole tensors are prefetched
    whole = [key for key in keys if row_blocks(first.shapes[key], itemsize[key]) is None]
    prefetch = max(((k + 1) * size[key] for key in whole), default=0)
    gram_bytes = 8 if inputs.stats and getattr(inputs.stats[0], "dtype", "") == "float64" else 4
    for layers in groups.values():
        d = layers[0].d_in + 1
        d_out = sum(layer.d_out for layer in layers)
        weight_bytes = sum(size[layer.weight_key] for layer in layers)
        # K Grams as read; one float64 Gram being added, the system and its factor; K float64 weights,
        # their average, the right-hand side and the solution
        working = max(working, gram_bytes * k * d * d + 8 * 3 * d * d + 8 * (k + 3) * d_out * d)
        prefetch = max(prefetch, k * (gram_bytes * d * d + weight_bytes))
    regmean_layers = sum(len(g) for g in groups.values())
    write = sum(layout_bytes(layout) for layout in layouts)
    return MergePlan(len(keys), regmean_layers, read, write, working, prefetch, current_rss())


def check_memory(plan: MergePlan, max_memory: int | None) -> None:
    if max_memory is not None and plan.peak_bytes > max_memory:
        raise RegmeanError(
            f"estimated peak memory {human(plan.peak_bytes)} exceeds --max-memory {human(max_memory)} "
            f"(largest step {human(plan.working_bytes)}, next step's inputs {human(plan.prefetch_bytes)}); "
            "raise the limit or merge on a machine with more memory"
        )
