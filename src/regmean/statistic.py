"""What a statistic is to regmean: something measured on an owner's data, written to a file, and read by the merge
methods that need it. A statistic is one module (its file format and lazy reader, how it is measured, the `regmean`
command that measures it) plus its line in `regmean.measure.STATISTICS`; a method names the statistic it reads.
Gram statistics (`regmean measure`, `regmean.stats`) and the diagonal Fisher (`regmean fisher`,
`regmean.measure.fisher`) are the two."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class StatisticsSource(Protocol):
    """A model's statistics file as a merge sees it (opened lazily, its header checked)."""

    path: Path
    fingerprint: dict[str, str]
    examples: int
    nbytes: int
    provenance: list[dict]

    def describe(self) -> str:
        """What was measured, for the model card's table ('150 examples, 3,000 tokens (float32)')."""
        ...


@dataclass(frozen=True)
class Statistic:
    command: str
    """`regmean COMMAND` measures it."""
    reader: Callable[[Path], StatisticsSource]
    """Opens one model's file (or the folder holding it) for a merge."""
    implementation: str
    """The command's function as "module:function", imported when the command line is built."""

    @property
    def measured_by(self) -> str:
        """The command that measures it, for messages."""
        return f"regmean {self.command}"

    def load_command(self) -> Callable:
        module, _, function = self.implementation.partition(":")
        return getattr(importlib.import_module(module), function)
