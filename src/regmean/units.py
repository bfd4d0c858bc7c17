"""Byte sizes written and read by people: '500MB', '2GB', '1.5GiB'."""

from __future__ import annotations

import re

from regmean.errors import RegmeanError

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int, what: str = "size") -> int:
    """'500MB', '2GB', '1.5GiB' or a number of bytes: a positive size below 1 PB."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).upper() not in UNITS:
            raise RegmeanError(f"{what} {str(text)[:40]!r}: write a number with an optional unit (KB, MB, GB, GiB)")
        value = float(match.group(1)) * UNITS[match.group(2).upper()]
    if not 0 < value < 10**15:  # (a float of 400 digits is inf: refused here, before int())
        raise RegmeanError(f"{what} {str(text)[:40]!r}: must be more than 0 bytes and less than 1 PB")
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
