"""Read and write safetensors files one tensor at a time with plain positioned I/O (no memory map).

Reading with `os.pread` into a fresh buffer means a tensor's memory is freed when the caller drops it: the
process never accumulates resident file-backed pages of the inputs, so resident memory stays about the working
set however large the files. Writing with a layout declared up front lets every tensor go to its final place in
its shard as soon as it is computed, so nothing is buffered until a shard is full.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from regmean.errors import RegmeanError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024**2


class TensorFile:
    """A safetensors file's header parsed at open (sizes checked against the file), tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise RegmeanError(f"{self.path}: cannot open ({exc.strerror})") from exc
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        if len(raw) < 8:
            raise RegmeanError(f"{self.path}: not a safetensors file (too short); re-save or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise RegmeanError(f"{self.path}: unreadable safetensors header (truncated or corrupt file)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegmeanError(f"{self.path}: unreadable safetensors header ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end = 0
        for key, e in header.items():
            begin, stop = e["data_offsets"]
            dtype, shape = e["dtype"], tuple(e["shape"])
            if dtype not in DTYPES:
                raise RegmeanError(f"{self.path}: tensor {key} has unsupported dtype {dtype}")
            if stop - begin != math.prod(shape) * DTYPES[dtype].itemsize:
                raise RegmeanError(f"{self.path}: tensor {key} has a size that does not match its shape")
            self._entries[key] = (dtype, shape, begin, stop)
            end = max(end, stop)
        if self._start + end > size:
            raise RegmeanError(
                f"{self.path}: truncated safetensors file ({size} bytes, the header needs {self._start + end}); "
                "re-save or re-download it"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def nbytes(self, key: str) -> int:
        _, _, begin, stop = self._entries[key]
        return stop - begin

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows [start, stop) along the first dimension (one contiguous read)."""
        dtype, shape, begin, stop = self._entries[key]
        if rows is not None:
            row_bytes = (stop - begin) // shape[0] if shape and shape[0] else 0
            begin, stop = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        buffer = bytearray(stop - begin)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(self._fd, [view[done:]], self._start + begin + done)
            if got == 0:
                raise RegmeanError(f"{self.path}: tensor {key} ends past the end of the file")
            done += got
        if not buffer:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[dtype]).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            self.close()


class PlannedFile:
    """A safetensors file whose layout (names, dtypes, shapes) is known before its tensors: the header is written
    at creation and each tensor is written to its offset when it arrives, in any order."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.names = list(layout)
        self._offsets: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        header: dict = {"__metadata__": metadata}
        offset = 0
        # largest element size first keeps every tensor aligned to its element size
        for name, (dtype, shape) in sorted(layout.items(), key=lambda kv: (-kv[1][0].itemsize, kv[0])):
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._offsets[name] = (dtype, tuple(shape), offset, offset + size)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._start = 8 + len(text)
        self._missing = set(layout)
        self._written: dict[str, int] = {}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)
        os.ftruncate(self._fd, self._start + offset)

    def write(self, name: str, tensor: torch.Tensor, first_row: int | None = None) -> None:
        """Write a whole tensor, or (with `first_row`) a block of its rows; a tensor is done when all its bytes are."""
        dtype, shape, begin, stop = self._offsets[name]
        expected = shape if first_row is None else (tensor.shape[0], *shape[1:])
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(expected):
            raise RegmeanError(
                f"{self.path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
            )
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        if first_row is not None:
            begin += first_row * ((stop - begin) // shape[0])
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._start + begin + done)
        self._written[name] = self._written.get(name, 0) + len(data)
        if self._written[name] >= stop - self._offsets[name][2]:
            self._missing.discard(name)

    @property
    def missing(self) -> set[str]:
        return self._missing

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
