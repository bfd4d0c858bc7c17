"""Data-parallel measuring with torch.distributed: shard examples by rank, sum statistics, rank 0 writes.

Statistics are sums and counts, so the statistics of the whole data set are the sums of the ranks' statistics.
Launch with `torchrun --nproc_per_node N -m regmean measure ...` (or `regmean measure --nproc N`); multi-node runs
use torchrun's standard rendezvous (`--nnodes`, `--rdzv-endpoint`). Backends: NCCL for CUDA devices, Gloo for CPU.
"""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from regmean.devices import check_device
from regmean.errors import RegmeanError

T = TypeVar("T")
PEER_FAILED = "another process of the run failed or was stopped"
"""How a rank says that a collective broke because a peer died or failed: the peer's own error is the cause (the
`--nproc` launcher reports that one instead)."""


class PeerFailed(RegmeanError):
    """A collective broke: another rank failed or was stopped (its own error is the cause)."""


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
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout())
    atexit.register(_leave)
    return device


def timeout() -> timedelta:
    """How long a rank waits for its peers: REGMEAN_DIST_TIMEOUT seconds (default 1800)."""
    text = os.environ.get("REGMEAN_DIST_TIMEOUT", "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 1e9:  # (NaN fails too)
        shown = repr(text)[:40]
        raise RegmeanError(f"REGMEAN_DIST_TIMEOUT={shown}: give the seconds a process waits for the others, e.g. 1800")
    return timedelta(seconds=seconds)


def collective(call: Callable[..., T], *args, **kwargs) -> T:
    """A collective call; a peer that died or failed shows here as a broken connection: said as such."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as exc:  # (torch's DistBackendError is one)
        raise PeerFailed(f"{PEER_FAILED} (see its error); nothing was written ({exc})") from exc


def _leave() -> None:
    """Tear the process group down before the interpreter exits: left to exit, its communication threads can be
    destroyed while still joinable, which aborts the process after its work is done ("terminate called without an
    active exception"). A SIGTERM then (the agent stopping the ranks) is ignored: the process is exiting already,
    and raised inside an exit handler it would print a traceback."""
    if dist.is_initialized():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        collective(dist.reduce, tensor, dst=0, op=dist.ReduceOp.SUM)
    return tensor


def sum_int(value: int, device: str | torch.device = "cpu") -> int:
    """The sum of an integer over ranks, known to every rank."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return int(t.item())


def check_same(value: str, what: str) -> None:
    """Fail on every rank if ranks disagree on `value` (e.g. the detected site layout)."""
    if not active():
        return
    values: list[str | None] = [None] * world_size()
    collective(dist.all_gather_object, values, value)
    if len(set(values)) > 1:
        raise RegmeanError(f"processes disagree on {what}; every rank must load the same model")
