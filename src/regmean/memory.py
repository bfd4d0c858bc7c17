"""This process's memory: resident now, and the peak while a piece of work runs (for the estimates said before
long work)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    if STATUS.is_file():
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def current_rss() -> int:
    """This process's resident memory now (libraries loaded, inputs opened): the floor under any estimate.

    Linux: VmRSS of /proc/self/status. Elsewhere the peak from getrusage (on Linux that value is inherited across
    fork and exec, so a process started by a large parent would report the parent's peak)."""
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Peak:
    bytes: int | None = None
    """Memory above the start at the peak of the work, on its device; None where it cannot be read."""


@contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[Peak]:
    """The peak while the block runs: the CUDA allocator's on a GPU; on a Linux CPU the resident set's high-water
    mark, reset at the start through /proc/self/clear_refs (elsewhere, or where that is not allowed: None)."""
    peak, dev = Peak(), torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        yield peak
        peak.bytes = torch.cuda.max_memory_allocated(dev) - start
        return
    start, resettable = current_rss(), dev.type == "cpu" and _reset_high_water_mark()
    yield peak
    high = _status_bytes("VmHWM") if resettable else None
    peak.bytes = None if high is None else max(0, high - start)


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
