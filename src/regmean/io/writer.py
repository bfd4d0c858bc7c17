"""Streaming sharded safetensors output with a layout declared up front.

The output tensors' names, dtypes and shapes are known before the merge starts (they are the inputs'), so the
shards and their headers are laid out first and each tensor is written to its final place the moment it is
computed: nothing is buffered. Shards carry temporary names until `finish`, which names them
model-0000i-of-0000n.safetensors with a model.safetensors.index.json (or a single model.safetensors), as
transformers' save_pretrained does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from regmean.errors import RegmeanError
from regmean.io.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from regmean.io.tensorfile import PlannedFile
from regmean.io.untrusted import check_finite

DEFAULT_SHARD_BYTES = 5 * 1024**3
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def layout_bytes(layout: Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout.values())


class ShardedWriter:
    """Write the tensors of `layout` (in its order) into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own). `add` accepts the tensors in any order."""

    def __init__(self, folder: Path, layout: Layout, max_shard_bytes: int = DEFAULT_SHARD_BYTES, create: bool = True):
        """`create`: make the shards; otherwise write into the shards another process made with the same layout
        (the shard names and offsets follow from the layout alone)."""
        self.folder = folder
        if create:  # (a process attaching to shards another made must not re-create a folder removed meanwhile)
            self.folder.mkdir(parents=True, exist_ok=True)
        groups: list[Layout] = [{}]
        filled = 0
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * dtype.itemsize
            if groups[-1] and filled + size > max_shard_bytes:
                groups.append({})
                filled = 0
            groups[-1][name] = (dtype, shape)
            filled += size
        self.total_bytes = layout_bytes(layout)
        self._files: list[PlannedFile] = []
        try:
            for i, group in enumerate(groups):
                self._files.append(PlannedFile(folder / f".shard-{i:05d}.partial", group, {"format": "pt"}, create))
        except BaseException:
            for f in self._files:
                f.close()
            raise
        self._file_of = {name: f for f in self._files for name in f.missing}

    def add(self, name: str, tensor: torch.Tensor, first_row: int | None = None, metric=None) -> None:
        """Write tensor `name`, or with `first_row` a block of its rows starting there (`metric`, the system a
        weight was solved in, matters only to a low-rank output: `merge.lora_writer`)."""
        if name not in self._file_of:
            raise RegmeanError(f"{self.folder}: tensor {name} is not in the planned output")
        check_finite(tensor, f"merged tensor {name} (check the recipe's weights and scaling; nothing was written)")
        self._file_of[name].write(name, tensor, first_row)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (or rows of it) as written so far (a resumed merge's finished steps)."""
        from regmean.io.tensorfile import TensorFile

        return TensorFile(self._file_of[name].path).get(name, rows)

    def written(self) -> list[dict[str, int]]:
        """Bytes written per tensor, per shard (for the process that finishes the shards)."""
        return [f.written for f in self._files]

    def add_written(self, counts: list[dict[str, int]]) -> None:
        """Count what another process wrote into these shards (`written()` there)."""
        for f, shard in zip(self._files, counts, strict=True):
            f.add_written(shard)

    def close(self) -> None:
        """Flush and close the shards (a process that only writes into them is then done)."""
        for f in self._files:
            f.close()

    def finish(self) -> list[Path]:
        """Check every planned tensor arrived, give the shards their final names and write the index."""
        missing = sorted(name for f in self._files for name in f.missing)
        if missing:
            raise RegmeanError(f"{self.folder}: {len(missing)} planned tensors were never written ({missing[0]}, ...)")
        n = len(self._files)
        if n == 1:
            final = [self.folder / SAFETENSORS_SINGLE]
        else:
            final = [self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for f, path in zip(self._files, final, strict=True):
            f.close()
            f.path.rename(path)
            weight_map.update(dict.fromkeys(f.names, path.name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return final
