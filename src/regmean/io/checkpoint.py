"""Lazy, tensor-at-a-time access to a Hugging Face model folder's weights."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch

from regmean.errors import RegmeanError
from regmean.io.tensorfile import TensorFile

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """A model folder: config.json plus safetensors weights (single file or sharded with an index).

    Tensors are read one at a time (`TensorFile`, positioned reads); nothing loads or maps the whole model.
    Pickle checkpoints (`pytorch_model.bin`) are refused unless `allow_pickle` (then read with
    `torch.load(weights_only=True)`).
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RegmeanError(f"{self.path}: model folder not found")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise RegmeanError(f"{config_file}: missing; a model folder needs config.json (save_pretrained writes it)")
        try:
            self.config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise RegmeanError(f"{config_file}: not valid JSON ({exc})") from exc
        self._pickle: dict[str, torch.Tensor] | None = None
        self._handles: dict[Path, TensorFile] = {}
        self.key_to_file = self._locate(allow_pickle)

    # -- discovery ---------------------------------------------------------------------------------
    def _locate(self, allow_pickle: bool) -> dict[str, Path]:
        single, index = self.path / SAFETENSORS_SINGLE, self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {k: self.path / f for k, f in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise RegmeanError(f"{f}: shard named in {index.name} is missing")
            return files
        if single.is_file():
            return dict.fromkeys(self._open(single).keys(), single)
        pickles = [p for p in (self.path / PICKLE_SINGLE, self.path / PICKLE_INDEX) if p.is_file()]
        if pickles:
            if not allow_pickle:
                raise RegmeanError(
                    f"{pickles[0]}: pickle checkpoint refused (it can run arbitrary code); convert it with "
                    "save_pretrained(..., safe_serialization=True), or if you trust it allow it "
                    "(`allow_pickle: true` in a merge recipe, `--allow-pickle` to measure)"
                )
            return self._load_pickle(pickles[0])
        raise RegmeanError(f"{self.path}: no model weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")

    def _load_pickle(self, first: Path) -> dict[str, Path]:
        if first.name == PICKLE_INDEX:
            files = sorted({self.path / f for f in json.loads(first.read_text())["weight_map"].values()})
        else:
            files = [first]
        self._pickle = {}
        for f in files:
            try:
                self._pickle.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as exc:  # torch raises many types for corrupt files
                raise RegmeanError(f"{f}: cannot read checkpoint ({exc})") from exc
        return dict.fromkeys(self._pickle, first)

    def _open(self, file: Path) -> TensorFile:
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = TensorFile(file)
        return handle

    # -- access ------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "unknown")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickle is not None:
            return tuple(self._pickle[key].shape)
        return self._open(self.key_to_file[key]).shape(key)

    def dtype(self, key: str) -> str:
        """The safetensors dtype name (F32, BF16, ...)."""
        if self._pickle is not None:
            return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
                self._pickle[key].dtype, "I64"
            )
        return self._open(self.key_to_file[key]).dtype(key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `key`, or only its rows [start, stop) along the first dimension."""
        if self._pickle is not None:
            t = self._pickle[key]
            return t if rows is None else t[rows[0] : rows[1]]
        file = self.key_to_file[key]
        handle = self._open(file)
        if key not in handle:
            raise RegmeanError(f"{file}: tensor {key} is named in the index but missing from the shard")
        return handle.get(key, rows)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}

    @cached_property
    def fingerprint(self) -> dict[str, str]:
        """Architecture, a hash of tensor names and shapes, and a hash of the weights' bytes.

        The weights hash covers (name, dtype, shape, bytes) in sorted name order, so re-sharding or re-saving the
        same weights keeps it; any change to any weight changes it.
        """
        shapes = hashlib.blake2b(digest_size=16)
        weights = hashlib.blake2b(digest_size=16)
        for key in sorted(self.keys()):
            t = self.get(key).contiguous()
            head = f"{key}:{str(t.dtype)}:{tuple(t.shape)};".encode()
            shapes.update(f"{key}:{tuple(t.shape)};".encode())
            weights.update(head)
            weights.update(t.reshape(-1).view(torch.uint8).numpy())
        return {
            "architecture": self.architecture,
            "model_type": str(self.config.get("model_type", "")),
            "shapes": shapes.hexdigest(),
            "weights": weights.hexdigest(),
        }
