"""Local text data for measuring: JSONL, JSON, CSV/TSV (optionally compressed) or Parquet, read in place."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from regmean.errors import RegmeanError, one_line


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None = None
    target: str | None = None


COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def read_table(path: str | Path) -> pd.DataFrame:
    """The file's rows; texts stay as written (no number, date or "NA" parsing)."""
    path = Path(path)
    if not path.is_file():
        raise RegmeanError(f"{path}: data file not found")
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION else ""
    opener, opener_name = COMPRESSION.get(compressed, open), compressed and f" compressed with {compressed[1:]}"
    kind = suffixes[-1] if suffixes else ""
    try:
        if kind in (".jsonl", ".ndjson", ".json"):
            with opener(path, "rt", encoding="utf-8") as f:
                rows = json.load(f) if kind == ".json" else [json.loads(line) for line in f if line.strip()]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise RegmeanError(f"{path}: expected a list of objects, one per example")
            return pd.DataFrame(rows, dtype=object)
        if kind in (".csv", ".tsv"):
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                return pd.read_csv(f, sep="\t" if kind == ".tsv" else ",", dtype=str, keep_default_na=False)
        if kind == ".parquet":
            return pd.read_parquet(path)
    except RegmeanError:
        raise
    except RecursionError:
        raise RegmeanError(f"{path}: cannot parse as {kind[1:]} (nested too deeply)") from None
    except Exception as exc:  # decompressors, json, pandas and pyarrow each raise their own types
        detail = one_line(f"{type(exc).__name__}: {exc}", 200)
        raise RegmeanError(f"{path}: cannot read as {kind[1:]}{opener_name} ({detail})") from None
    raise RegmeanError(
        f"{path}: unknown data format {kind or '(none)'}; use .jsonl, .json, .csv, .tsv (each optionally .gz, .bz2 "
        "or .xz) or .parquet"
    )


def load_examples(
    path: str | Path,
    text_field: str = "text",
    text_pair_field: str | None = None,
    target_field: str | None = None,
    max_examples: int | None = None,
) -> list[Example]:
    """Rows with an empty or missing text are skipped; the first `max_examples` remaining rows are kept."""
    if max_examples is not None and max_examples < 1:
        raise RegmeanError(f"max_examples must be at least 1, not {max_examples}")
    table = read_table(path)
    for field in (text_field, text_pair_field, target_field):
        if field is not None and field not in table.columns:
            raise RegmeanError(f"{path}: no column {field!r}; columns are {', '.join(map(str, table.columns))}")

    def cell(row, field, number):
        if field is None:
            return None
        value = row[field]
        if isinstance(value, str):
            return value or None
        if value is None or (isinstance(value, float) and math.isnan(value)):  # missing
            return None
        raise RegmeanError(
            f"{path}: row {number}: {field!r} is a {type(value).__name__}, not text; write it as a string"
        )

    examples = []
    for number, (_, row) in enumerate(table.iterrows(), start=1):
        text = cell(row, text_field, number)
        if not text or not text.strip():
            continue
        pair = cell(row, text_pair_field, number) or ("" if text_pair_field else None)
        examples.append(Example(text, pair, cell(row, target_field, number)))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise RegmeanError(f"{path}: no non-empty {text_field!r} values")
    return examples
