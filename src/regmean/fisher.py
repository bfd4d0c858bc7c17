"""The Fisher statistics file: diagonal Fisher per parameter, `{parameter}::fisher` in safetensors, with the
same metadata as Gram statistics (format regmean.fisher). Measured by `regmean.bench.fisher.measure_fisher`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from regmean import __version__
from regmean.errors import RegmeanError
from regmean.io.checkpoint import Checkpoint
from regmean.stats import open_statistics, write_atomic

FORMAT = "regmean.fisher"
FILE_NAME = "fisher.safetensors"
NORMALISATION = "mean over examples of the expected squared score under the model's own predictive distribution"


def save_fisher(fisher: dict[str, torch.Tensor], model_dir: str | Path, out: str | Path, examples: int) -> Path:
    out = Path(out)
    metadata = {
        "format": FORMAT,
        "format_version": "1",
        "library": f"regmean {__version__}",
        "fingerprint": json.dumps(Checkpoint(model_dir).fingerprint, sort_keys=True),
        "examples": str(examples),
        "normalisation": NORMALISATION,
    }
    tensors = {f"{n}::fisher": f.contiguous() for n, f in fisher.items()}
    return write_atomic(tensors, metadata, out / FILE_NAME if out.suffix != ".safetensors" else out)


class FisherFile:
    """A Fisher statistics file opened lazily: one parameter's Fisher when asked."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path / FILE_NAME if path.is_dir() else path
        self._handle, meta = open_statistics(self.path, FORMAT, "Fisher statistics")
        self.fingerprint: dict[str, str] = json.loads(meta["fingerprint"])
        self.examples = int(meta["examples"])
        self.nbytes = self.path.stat().st_size
        self.keys = {k.rsplit("::", 1)[0] for k in self._handle.keys()}

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if key not in self.keys:
            return None
        f = self._handle.get(f"{key}::fisher", rows)
        if not torch.isfinite(f).all():
            raise RegmeanError(f"{self.path}: Fisher of {key} has NaN or Inf values")
        return f
