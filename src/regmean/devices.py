"""Device names checked before any work: a device this machine lacks is one clear line, not a traceback."""

from __future__ import annotations

import torch

from regmean.errors import RegmeanError


def check_device(device: str) -> None:
    """Refuse, in one line, a device this machine does not have (torch would fail deep inside with a traceback)."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise RegmeanError(f"device {device!r}: not a device name (cpu, cuda, cuda:1, mps ...)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RegmeanError(f"device {device!r}: CUDA is not available here (no GPU, or a CPU-only torch build)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RegmeanError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RegmeanError(f"device {device!r}: MPS is not available here")
