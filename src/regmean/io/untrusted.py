"""Parsers of input the user hands us (JSON files and headers, regular expressions, numbers): each either returns a
value of the expected type or raises a one-line `RegmeanError` naming where the input came from."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from regmean.errors import RegmeanError, one_line

MAX_JSON_FILE = 64 * 1024**2
"""config.json and index files larger than this are refused (real ones are kilobytes to a few megabytes)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, where: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity, bounded nesting; any failure is one line about `where`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")  # json.loads would guess UTF-16 or UTF-32 from the first bytes
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise RegmeanError(f"{where}: JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RegmeanError(f"{where}: not valid JSON ({one_line(str(exc), 200)})") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, an index)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE:
            raise RegmeanError(f"{path}: {size} bytes is too large for {what}")
        raw = path.read_bytes()
    except OSError as exc:
        raise RegmeanError(f"{path}: cannot read {what} ({exc.strerror})") from None
    value = parse_json(raw, str(path))
    if not isinstance(value, dict):
        raise RegmeanError(f"{path}: {what} must be a JSON object, not a {type(value).__name__}")
    return value


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json, which must exist and hold a JSON object."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RegmeanError(f"{config_file}: missing; a model folder needs config.json (save_pretrained writes it)")
    return read_json_object(config_file, "a model config")


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise RegmeanError(f"{where}: invalid regular expression {pattern!r} ({exc})") from None


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor: one pass summing it (a NaN or Inf makes the sum one), and only when that
    sum is not finite (or merely overflows) the entry-by-entry check. Float8 types are widened to check."""
    probe = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor
    if bool(torch.isfinite(probe.sum())):
        return True
    return bool(torch.isfinite(probe).all())


def check_finite(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """Refuse NaN or Inf in a floating tensor."""
    if tensor.is_floating_point() and not all_finite(tensor):
        raise RegmeanError(f"{where}: has NaN or Inf values")
    return tensor
