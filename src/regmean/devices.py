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


class Stager:
    """Copies a step's inputs to the compute device from the reader thread: through pinned host memory, on a
    stream of its own, waiting for the copies there, so the compute thread finds them ready and transfers overlap
    the previous step's arithmetic. On the CPU it returns the tensors as they are."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return tensors
        if self._stream is None:
            return [t.to(self.device) for t in tensors]
        with torch.cuda.stream(self._stream):
            moved = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        self._stream.synchronize()
        for t in moved:  # used on the compute thread's stream: the allocator must not reuse them before it is done
            t.record_stream(torch.cuda.default_stream(self.device))
        return moved
