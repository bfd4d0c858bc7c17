"""Parsers of input the user hands us (JSON files and headers, regular expressions, numbers): each either returns a
value of the expected type or raises a one-line `RegmeanError` naming where the input came from."""

from __future__ import annotations

import errno
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import regex
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


PATTERN_SECONDS = 0.25
"""Longest one match of a user's pattern against one name may take: real patterns take microseconds on names, and
the margin keeps a busy machine's pauses (the limit is wall-clock time) from refusing them."""
PATTERN_BUDGET = 5.0
"""Longest all matches of one pattern together may take."""
PATTERN_SIZE = 100_000
"""Largest pattern length times the product of its repeat counts (`{n}`, `{m,n}`): the regex engine expands counted
repeats when it compiles, so `(a{1000}){1000}` would take gigabytes before any match."""
REPEAT_COUNT = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class UserPattern:
    """A user's regular expression (Python `re` syntax) whose match, search and fullmatch are bounded in time: each
    call stops after PATTERN_SECONDS, all calls together after PATTERN_BUDGET, with a one-line RegmeanError."""

    def __init__(self, compiled: regex.Pattern, shown: str, where: str):
        self.compiled, self.pattern, self.where = compiled, shown, where
        self.spent = 0.0

    def match(self, name: str) -> regex.Match | None:
        return self._run(self.compiled.match, name)

    def search(self, name: str) -> regex.Match | None:
        return self._run(self.compiled.search, name)

    def fullmatch(self, name: str) -> regex.Match | None:
        return self._run(self.compiled.fullmatch, name)

    def _run(self, method: Callable[..., regex.Match | None], name: str) -> regex.Match | None:
        limit = min(PATTERN_SECONDS, PATTERN_BUDGET - self.spent)
        start = time.perf_counter()
        try:
            if limit <= 0:
                raise TimeoutError
            return method(name, timeout=limit)
        except TimeoutError:
            raise RegmeanError(
                f"{self.where}: pattern {self.pattern!r} takes too long to match names (over {PATTERN_SECONDS} s for "
                f"one name or {PATTERN_BUDGET} s in all: it backtracks); simplify it"
            ) from None
        finally:
            self.spent += time.perf_counter() - start


def pattern_size(pattern: str) -> int:
    """An upper bound on what compiling `pattern` expands to: its length times every repeat count in it (+1 each),
    nested or not; counted textually, so no construct can hide a repeat from it."""
    size = max(len(pattern), 1)
    for found in REPEAT_COUNT.finditer(pattern):
        counts = [int(g) if len(g) < 10 else 10**10 for g in found.groups() if g]
        size *= max(counts, default=0) + 1
        if size > PATTERN_SIZE:
            break
    return size


def compile_pattern(pattern: str, where: str, shown: str | None = None) -> UserPattern:
    """A user's regular expression, bounded in what it may cost (`shown` is what messages quote: the user's own text
    when `pattern` wraps it)."""
    shown = pattern if shown is None else shown
    if not isinstance(pattern, str):
        raise RegmeanError(f"{where}: {shown!r:.80} is not a regular expression (a string)")
    if pattern_size(pattern) > PATTERN_SIZE:
        raise RegmeanError(
            f"{where}: pattern {shown!r:.200} is too large (its length times its repeat counts exceeds "
            f"{PATTERN_SIZE:,}); simplify it"
        )
    try:
        return UserPattern(regex.compile(pattern), shown, where)
    except (regex.error, re.error, RecursionError, OverflowError, ValueError) as exc:
        raise RegmeanError(f"{where}: invalid regular expression {shown!r} ({exc})") from None


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


def resolve_user_path(path: str | Path, what: str) -> Path:
    """A path the user gave, made absolute with its symbolic links followed (it need not exist): a symbolic link
    loop on the way (pathlib's RuntimeError, or OSError ELOOP from Python 3.13) is one line, not a traceback."""
    try:
        return Path(path).resolve()
    except RuntimeError:
        pass
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise RegmeanError(f"{path}: cannot follow the path of the {what} ({exc.strerror})") from None
    raise RegmeanError(f"{path}: a symbolic link loop (the {what}); give a real folder")
