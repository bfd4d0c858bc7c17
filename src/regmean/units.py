"""Byte sizes written and read by people: '500MB', '2GB', '1.5GiB'."""

from __future__ import annotations

import re

from regmean.errors import RegmeanError

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'500MB', '2GB', '1.5GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise RegmeanError(f"size {text!r}: write a number with an optional unit (KB, MB, GB, GiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
