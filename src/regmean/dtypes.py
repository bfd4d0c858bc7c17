"""The one table of dtypes: safetensors' names for stored tensors and the names people write in options."""

from __future__ import annotations

import torch

from regmean.errors import RegmeanError

STORED: dict[str, torch.dtype] = {
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
"""safetensors dtype name -> torch dtype."""
STORED_NAMES: dict[torch.dtype, str] = {v: k for k, v in STORED.items()}

FLOATS: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The floating dtypes by the names written in options and flags."""
STORED_FLOATS = tuple(k for k, v in STORED.items() if v in FLOATS.values())
"""The safetensors names of those (F64, F32, F16, BF16): what an adapter's or a model's weights may be stored as."""
STATISTICS = ("float32", "float64")
"""Dtypes statistics are summed and stored in."""


def named(name: str, allowed: tuple[str, ...] | dict, what: str) -> torch.dtype:
    """The torch dtype of `name`, one of `allowed`; anything else is a one-line error naming `what`."""
    if name not in allowed or name not in FLOATS:
        raise RegmeanError(f"{what} {name!r}: use one of {', '.join(allowed)}")
    return FLOATS[name]


def name(dtype: torch.dtype) -> str:
    """The name people write for a floating dtype ('float32')."""
    return next(k for k, v in FLOATS.items() if v == dtype)


def itemsize(stored: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return STORED[stored].itemsize
