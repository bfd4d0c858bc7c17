"""The Fisher statistics file: diagonal Fisher per parameter, `{parameter}::fisher` in safetensors, with the
same metadata as Gram statistics (format regmean.fisher). Measured by `regmean.measure.fisher.measure_fisher`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from regmean import __version__
from regmean.dtypes import STORED
from regmean.errors import RegmeanError
from regmean.io.checkpoint import Checkpoint
from regmean.io.staged import replaceable_target, target_file, write_atomic
from regmean.stats import open_statistics

FORMAT = "regmean.fisher"
FILE_NAME = "fisher.safetensors"
NORMALISATION = "mean over examples of the expected squared score under the model's own predictive distribution"


def fisher_file(
    fisher: dict[str, torch.Tensor], fingerprint: dict[str, str], examples: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a Fisher statistics file."""
    metadata = {
        "format": FORMAT,
        "format_version": "1",
        "library": f"regmean {__version__}",
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "examples": str(examples),
        "normalisation": NORMALISATION,
    }
    return {f"{n}::fisher": f.contiguous() for n, f in fisher.items()}, metadata


def save_fisher(fisher: dict[str, torch.Tensor], model_dir: str | Path, out: str | Path, examples: int) -> Path:
    tensors, metadata = fisher_file(fisher, Checkpoint(model_dir).fingerprint, examples)
    return write_atomic(tensors, metadata, replaceable_target(Path(out), FILE_NAME, FORMAT))


class FisherFile:
    """A Fisher statistics file opened lazily (header checked at open): one parameter's Fisher when asked."""

    def __init__(self, path: str | Path):
        self.path = target_file(Path(path), FILE_NAME)
        self._handle, meta = open_statistics(self.path, FORMAT, "Fisher statistics")
        self.fingerprint = meta.fingerprint()
        self.examples = meta.natural("examples")
        self.nbytes = self.path.stat().st_size
        self.provenance: list[dict] = []  # Fisher files record no measuring runs
        self.keys: dict[str, str] = {}  # parameter -> its tensor in the file
        for key in self._handle.keys():
            name, sep, kind = key.rpartition("::")
            if not sep or kind != "fisher" or not STORED[self._handle.dtype(key)].is_floating_point:
                raise RegmeanError(f"{self.path}: entry {key!r} is not a floating {{parameter}}::fisher tensor")
            self.keys[name] = key

    def describe(self) -> str:
        return f"{self.examples} examples (Fisher)"

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handle.shape(self.keys[key])

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if key not in self.keys:
            return None
        f = self._handle.get(self.keys[key], rows)
        if not torch.isfinite(f).all() or bool((f < 0).any()):
            raise RegmeanError(f"{self.path}: Fisher of {key} has NaN, Inf or negative values; measure again")
        return f
