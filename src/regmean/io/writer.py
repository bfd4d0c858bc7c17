"""Streaming sharded safetensors output: tensors are buffered up to the shard size, then written and released.

Shards are written under temporary names; `finish` names them model-0000i-of-0000n.safetensors with a
model.safetensors.index.json (or a single model.safetensors), as transformers' save_pretrained does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from regmean.io.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

DEFAULT_SHARD_BYTES = 5 * 1024**3


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWriter:
    """Write a model's tensors into `folder` with at most `max_shard_bytes` per shard (one tensor may exceed it)."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor_bytes(tensor)
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffered += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.partial"
        save_file(self._buffer, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def finish(self) -> list[Path]:
        """Write what is buffered, give the shards their final names and write the index."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = [self.folder / SAFETENSORS_SINGLE]
        else:
            final = [self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, names), path in zip(self._shards, final, strict=True):
            tmp.rename(path)
            weight_map.update(dict.fromkeys(names, path.name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return final
