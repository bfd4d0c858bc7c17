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
from typing import Protocol, TypedDict


class ProvenanceRecord(TypedDict, total=False):
    """One measuring run as a statistics file records it (a combination keeps one per part). Read from files, so
    untrusted: `stats_checks` checks the counts before any is used."""

    examples: int
    tokens: int
    decoder_tokens: int
    """Rows of each stream the run measured (`stats_checks.STREAM_TOTALS`)."""
    max_length: int
    model_dtype: str
    processes: int
    data: str
    """The data file's name (not its path), and the columns read (`io.data.DATA_FIELDS`)."""
    text_field: str
    text_pair_field: str
    target_field: str
    messages_field: str
    prompt_field: str
    response_field: str
    formatting: str
    """How conversations were rendered (a chat template)."""
    adapter_of: str
    """The base model's folder name, for a LoRA adapter measured over it."""
    part: str
    """In a combination: the digest of what this part's data contributed (each part is added once)."""


class StatisticsSource(Protocol):
    """A model's statistics file as a merge sees it (opened lazily, its header checked)."""

    path: Path
    fingerprint: dict[str, str]
    examples: int
    nbytes: int
    provenance: list[ProvenanceRecord]

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
