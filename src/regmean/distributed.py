"""Data-parallel measuring with torch.distributed: shard examples by rank, sum statistics, rank 0 writes.

Statistics are sums and counts, so the statistics of the whole data set are the sums of the ranks' statistics.
Launch with `torchrun --nproc_per_node N -m regmean measure ...` (or `regmean measure --nproc N`); multi-node runs
use torchrun's standard rendezvous (`--nnodes`, `--rdzv-endpoint`). Backends: NCCL for CUDA devices, Gloo for CPU.
"""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from regmean.devices import check_device
from regmean.errors import RegmeanError

T = TypeVar("T")


def launched() -> bool:
    """True inside a torchrun worker of a multi-process job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    """Processes of this job on this host: torchrun's LOCAL_WORLD_SIZE (`--nproc` runs torchrun); 1 outside
    torchrun, and under a launcher that does not set it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes; returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if not launched() or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        check_device(device)
        torch.cuda.set_device(device)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    timeout = timedelta(seconds=int(os.environ.get("REGMEAN_DIST_TIMEOUT", "1800")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    atexit.register(_leave)
    return device


def _leave() -> None:
    """Tear the process group down before the interpreter exits: left to exit, its communication threads can be
    destroyed while still joinable, which aborts the process after its work is done ("terminate called without an
    active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """torchrun stops the other ranks with SIGTERM when one dies: exit through Python so clean-up code runs."""
    raise SystemExit(128 + signum)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's examples: every world_size-th one from its rank, so each example is used exactly once."""
    if len(items) < world_size():
        raise RegmeanError(f"{len(items)} examples cannot be shared among {world_size()} processes")
    return list(items[rank() :: world_size()])


def sum_to_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks into rank 0's copy (in place); other ranks' copies are left unspecified."""
    if active():
        dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)
    return tensor


def sum_int(value: int, device: str | torch.device = "cpu") -> int:
    """The sum of an integer over ranks, known to every rank."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def check_same(value: str, what: str) -> None:
    """Fail on every rank if ranks disagree on `value` (e.g. the detected site layout)."""
    if not active():
        return
    values: list[str | None] = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise RegmeanError(f"processes disagree on {what}; every rank must load the same model")
