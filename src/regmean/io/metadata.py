"""Typed, bounded reads of a statistics file's header metadata (strings written by us, but read from anyone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from regmean.errors import RegmeanError, one_line
from regmean.io.untrusted import parse_json

MAX_FIELD = 16 * 1024**2
"""No metadata field may be longer (the module map of a 70B model is about 40 KB)."""
SCALARS = (str, int, float, bool, type(None))


class Metadata:
    """The `__metadata__` strings of one file, each read as the type it must have, or one clear error."""

    def __init__(self, meta: dict[str, str], path: Path):
        self.meta, self.path = meta, path

    def _raw(self, key: str, default: str | None) -> str:
        value = self.meta.get(key, default)
        if value is None:
            raise RegmeanError(f"{self.path}: metadata lacks {key!r}; not a complete statistics file (measure again)")
        if len(value) > MAX_FIELD:
            raise RegmeanError(f"{self.path}: metadata {key!r} is {len(value)} characters long (at most {MAX_FIELD})")
        return value

    def _bad(self, key: str, expected: str) -> RegmeanError:
        return RegmeanError(f"{self.path}: metadata {key!r} must be {expected}, not {one_line(self.meta[key], 80)!r}")

    def text(self, key: str, default: str | None = None) -> str:
        return self._raw(key, default)

    def natural(self, key: str, default: str | None = None) -> int:
        """A non-negative integer written in decimal digits."""
        raw = self._raw(key, default)
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise self._bad(key, "a non-negative integer")
        return int(raw)

    def json(self, key: str, default: str | None = None) -> Any:
        return parse_json(self._raw(key, default), f"{self.path}: metadata {key!r}")

    def str_map(self, key: str, default: str | None = None) -> dict[str, str]:
        value = self.json(key, default)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._bad(key, "a JSON object of strings")
        return value

    def records(self, key: str, default: str | None = None) -> list[dict[str, Any]]:
        """A JSON list of flat objects (string, number, boolean or null values)."""
        value = self.json(key, default)
        if not isinstance(value, list) or not all(
            isinstance(r, dict) and all(isinstance(v, SCALARS) for v in r.values()) for r in value
        ):
            raise self._bad(key, "a JSON list of flat objects")
        return value

    def privacy(self) -> dict[str, Any]:
        """{"withheld": [site, ...], "dp": {epsilon, delta, clip, noise_multiplier, ...}, "site_bounds": {site: c}};
        {} when not recorded."""
        value = self.json("privacy", "{}")
        withheld = value.get("withheld", []) if isinstance(value, dict) else None
        release = value.get("dp", {}) if isinstance(value, dict) else None
        bounds = value.get("site_bounds", {}) if isinstance(value, dict) else None
        if not (
            isinstance(bounds, dict)
            and all(isinstance(v, int | float) for v in bounds.values())
            and isinstance(withheld, list)
            and all(isinstance(w, str) for w in withheld)
            and isinstance(release, dict)
            and all(isinstance(v, SCALARS) for v in release.values())
            and ("dp" not in value or _valid_release(release, bounds))
        ):
            raise self._bad("privacy", "an object with a 'withheld' list, a 'dp' record and numeric 'site_bounds'")
        return value

    def site_streams(self) -> dict[str, tuple[str, int]]:
        """{site: (stream, calls per forward pass)}: which rows a site's count counts; {} when not recorded."""
        value = self.json("site_streams", "{}")
        if not isinstance(value, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and type(v[1]) is int and v[1] >= 1
            for v in value.values()
        ):
            raise self._bad("site_streams", "a JSON object of [stream, calls] pairs")
        return {site: (stream, calls) for site, (stream, calls) in value.items()}

    def fingerprint(self) -> dict[str, str]:
        value = self.str_map("fingerprint")
        missing = [k for k in ("architecture", "weights") if k not in value]
        if missing:
            raise self._bad("fingerprint", f"an object with {' and '.join(missing)}")
        return value


def describe_record(record: dict[str, Any], limit: int = 120) -> str:
    """One provenance record as `key=value, ...`, each part cut to `limit` characters (bounded output)."""
    return ", ".join(one_line(f"{k}={v}", limit) for k, v in record.items())


def _valid_release(release: dict, bounds: dict) -> bool:
    """A DP record carries its mechanism's numbers (epsilon, delta, clip and noise multiplier, positive and finite)
    and a positive bound for the sites it released: a bare `dp` claim is no release."""
    import math

    numbers = [release.get(k) for k in ("epsilon", "delta", "clip", "noise_multiplier")]
    numeric = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in numbers
    )
    return numeric and bool(bounds) and all(math.isfinite(v) and v > 0 for v in bounds.values())
