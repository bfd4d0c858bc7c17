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
from collections.abc import Iterator
from pathlib import Path

import torch

from regmean.dtypes import STORED, STORED_NAMES
from regmean.errors import RegmeanError
from regmean.io.untrusted import parse_json

MAX_HEADER = 100 * 1024**2


class StagedFileChanged(RegmeanError):
    """A file an interrupted merge staged is gone or no longer the one it laid out: the merge cannot continue it."""


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
        header = parse_json(os.pread(self._fd, n, 8), f"{self.path}: safetensors header")
        if not isinstance(header, dict):
            raise RegmeanError(f"{self.path}: safetensors header is a {type(header).__name__}, not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata  # null, as the safetensors library accepts
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise RegmeanError(f"{self.path}: safetensors __metadata__ must map names to strings")
        self.metadata: dict[str, str] = metadata
        self._start = 8 + n
        self._entries = {key: self._entry(key, value) for key, value in header.items()}
        end = 0  # tensors must tile the data section in order: no gap, no overlap (as the safetensors format says)
        for key, (_, _, begin, stop) in sorted(self._entries.items(), key=lambda kv: kv[1][2:]):
            if begin != end:
                raise RegmeanError(
                    f"{self.path}: tensor {key} starts at data byte {begin}, expected {end} "
                    "(tensors overlap or leave a gap: corrupt header)"
                )
            end = stop
        if self._start + end != size:
            problem = "truncated safetensors file" if self._start + end > size else "bytes after the last tensor in"
            raise RegmeanError(
                f"{self.path}: {problem} ({size} bytes, the header accounts for {self._start + end}); "
                "re-save or re-download it"
            )

    def _entry(self, key: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
        """One header entry checked completely: known dtype, shape of non-negative integers, offsets that
        are non-negative, ordered and exactly dtype x shape bytes apart."""

        def bad(what: str) -> RegmeanError:
            return RegmeanError(f"{self.path}: tensor {key!r} in the safetensors header {what}")

        if not isinstance(entry, dict):
            raise bad(f"is a {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in STORED:
            raise bad(f"has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise bad(f"has shape {shape!r}; expected a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
            raise bad(f"has data_offsets {offsets!r}; expected [begin, end], non-negative integers")
        begin, stop = offsets
        if stop - begin != math.prod(shape) * STORED[dtype].itemsize:
            raise bad(
                f"spans {stop - begin} bytes but {dtype} x {shape} needs {math.prod(shape) * STORED[dtype].itemsize}"
            )
        return dtype, tuple(shape), begin, stop

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows [start, stop) along the first dimension (one contiguous read)."""
        dtype, shape, begin, stop = self._entries[key]
        if rows is not None:
            if not (shape and 0 <= rows[0] <= rows[1] <= shape[0]):
                raise RegmeanError(f"{self.path}: rows {rows[0]}:{rows[1]} of tensor {key} of shape {list(shape)}")
            row_bytes = (stop - begin) // shape[0] if shape and shape[0] else 0
            begin, stop = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        return self._read(key, begin, stop).view(STORED[dtype]).reshape(shape)

    def chunks(self, key: str, max_bytes: int = 64 * 1024**2) -> Iterator[torch.Tensor]:
        """The tensor's elements in file order, as flat pieces of at most `max_bytes` (bounded memory for any size)."""
        dtype, _, begin, stop = self._entries[key]
        itemsize = STORED[dtype].itemsize
        step = max(itemsize, max_bytes // itemsize * itemsize)
        for first in range(begin, stop, step):
            yield self._read(key, first, min(first + step, stop)).view(STORED[dtype])

    def _read(self, key: str, begin: int, stop: int) -> torch.Tensor:
        """Bytes [begin, stop) of the data section as a uint8 tensor (one positioned read, retried until done)."""
        buffer = bytearray(stop - begin)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(self._fd, [view[done:]], self._start + begin + done)
            if got == 0:
                raise RegmeanError(f"{self.path}: tensor {key} ends past the end of the file")
            done += got
        return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            self.close()


def _natural(value: object) -> bool:
    """A JSON integer >= 0 (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PlannedFile:
    """A safetensors file whose layout (names, dtypes, shapes) is known before its tensors: the header is written
    at creation and each tensor is written to its offset when it arrives, in any order."""

    def __init__(
        self,
        path: Path,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str],
        create: bool = True,
    ):
        """`create`: make the file and write its header; otherwise open the file another process created (with the
        same layout) to write tensors into it."""
        self.path = path
        self.names = list(layout)
        self._offsets: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        header: dict = {"__metadata__": metadata}
        offset = 0
        # largest element size first keeps every tensor aligned to its element size
        for name, (dtype, shape) in sorted(layout.items(), key=lambda kv: (-kv[1][0].itemsize, kv[0])):
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": STORED_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._offsets[name] = (dtype, tuple(shape), offset, offset + size)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._start = 8 + len(text)
        self._missing = set(layout)
        self._written: dict[str, int] = {}
        if not create:  # the file must be laid out as planned here: same header, same size
            expected = struct.pack("<Q", len(text)) + text
            try:
                with open(path, "rb") as f:
                    same = f.read(len(expected)) == expected and os.fstat(f.fileno()).st_size == self._start + offset
            except OSError:
                same = False
            if not same:
                raise StagedFileChanged(f"{path}: missing, or not laid out as this merge plans it")
            self._fd = os.open(path, os.O_WRONLY)
            return
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
        self.add_written({name: len(data)})

    def add_written(self, counts: dict[str, int]) -> None:
        """Count bytes of tensors as written (here, or by another process into the same file)."""
        for name, size in counts.items():
            self._written[name] = self._written.get(name, 0) + size
            _, _, begin, stop = self._offsets[name]
            if self._written[name] >= stop - begin:
                self._missing.discard(name)

    @property
    def written(self) -> dict[str, int]:
        """Bytes written so far, per tensor."""
        return dict(self._written)

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
