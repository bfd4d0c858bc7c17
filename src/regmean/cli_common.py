"""What the commands share: the console (stderr, never reading markup), the pickle warning, writing on rank 0."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

from rich.console import Console

console = Console(stderr=True, markup=False)  # paths and texts from users are never read as markup
PICKLE_HELP = "Read a pytorch_model.bin checkpoint (pickle: only if you trust its source)"


def on_rank0(make_writer: Callable):
    """The writer (a context manager) on rank 0, which alone writes; nothing on the other ranks."""
    from regmean import distributed

    return make_writer() if distributed.rank() == 0 else nullcontext()
