"""Lazy, tensor-at-a-time access to a Hugging Face model folder's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch

from regmean.dtypes import STORED, STORED_NAMES
from regmean.errors import RegmeanError, one_line
from regmean.io.tensorfile import TensorFile
from regmean.io.untrusted import check_finite, read_json_object, read_model_config

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"


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
        if (self.path / ADAPTER_CONFIG).is_file():
            raise RegmeanError(
                f"{self.path}: a LoRA adapter, not a model folder; this command needs a full model "
                "(merge the adapter into its base with peft's merge_and_unload and save that)"
            )
        self.config: dict = read_model_config(self.path)
        archs = self.config.get("architectures")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise RegmeanError(
                f"{self.path}/config.json: 'architectures' must be a list of class names, not {archs!r:.80}"
            )
        self._pickle: dict[str, torch.Tensor] | None = None
        self._handles: dict[Path, TensorFile] = {}
        self.key_to_file = self._locate(allow_pickle)

    # -- discovery ---------------------------------------------------------------------------------
    def _locate(self, allow_pickle: bool) -> dict[str, Path]:
        single, index = self.path / SAFETENSORS_SINGLE, self.path / SAFETENSORS_INDEX
        if index.is_file():
            files = self._weight_map(index)
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise RegmeanError(f"{f}: shard named in {index.name} is missing")
                absent = [k for k, g in files.items() if g == f and k not in self._open(f)]
                if absent:
                    raise RegmeanError(
                        f"{f}: lacks {absent[0]}, which {index.name} places there ({len(absent)} missing)"
                    )
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

    def _weight_map(self, index: Path) -> dict[str, Path]:
        """An index's tensor -> shard map; shard names must be plain file names in this folder."""
        weight_map = read_json_object(index, "a sharded checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RegmeanError(f"{index}: no weight_map (tensor name -> shard file); re-save the model")
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
                raise RegmeanError(f"{index}: tensor {key} is mapped to {shard!r}, not a file name in the folder")
        return {k: self.path / f for k, f in weight_map.items()}

    def _load_pickle(self, first: Path) -> dict[str, Path]:
        files = sorted(set(self._weight_map(first).values())) if first.name == PICKLE_INDEX else [first]
        self._pickle, located = {}, {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for corrupt files
                raise RegmeanError(f"{f}: cannot read checkpoint ({one_line(str(exc), 200)})") from exc
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise RegmeanError(f"{f}: not a state dict of tensors")
            self._pickle.update(state)
            located.update(dict.fromkeys(state, f))
        return located

    def _open(self, file: Path) -> TensorFile:
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = TensorFile(file)
        return handle

    # -- access ------------------------------------------------------------------------------------
    @property
    def folders(self) -> tuple[Path, ...]:
        """Where the model's config and tokenizer files are."""
        return (self.path,)

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
            dtype = self._pickle[key].dtype
            if dtype not in STORED_NAMES:
                raise RegmeanError(f"{self.key_to_file[key]}: tensor {key} has unsupported dtype {dtype}")
            return STORED_NAMES[dtype]
        return self._open(self.key_to_file[key]).dtype(key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `key`, or only its rows [start, stop) along the first dimension; NaN or Inf is refused."""
        if self._pickle is not None:
            t = self._pickle[key]
            t = t if rows is None else t[rows[0] : rows[1]]
        else:
            t = self._open(self.key_to_file[key]).get(key, rows)
        return check_finite(t, f"{self.key_to_file[key]}: tensor {key}")

    def chunks(self, key: str) -> Iterator[torch.Tensor]:
        """Tensor `key` as flat pieces of bounded size, in storage order (for hashing any size)."""
        if self._pickle is not None:
            yield self._pickle[key].contiguous().reshape(-1)
        else:
            yield from self._open(self.key_to_file[key]).chunks(key)

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
            shape = self.shape(key)
            shapes.update(f"{key}:{shape};".encode())
            weights.update(f"{key}:{STORED[self.dtype(key)]}:{shape};".encode())
            for piece in self.chunks(key):  # NaN or Inf anywhere in the weights is refused here
                check_finite(piece, f"{self.key_to_file[key]}: tensor {key}")
                weights.update(piece.view(torch.uint8).numpy())
        return {
            "architecture": self.architecture,
            "model_type": str(self.config.get("model_type", "")),
            "shapes": shapes.hexdigest(),
            "weights": weights.hexdigest(),
        }
