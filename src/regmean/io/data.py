"""Local text data for measuring: JSONL, JSON, CSV/TSV (optionally compressed) or Parquet, read in place."""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from regmean.errors import RegmeanError, check_path, check_text, check_whole_number, one_line
from regmean.io.chat import Turns, read_turns

DATA_FIELDS = ("text_field", "text_pair_field", "target_field", "messages_field", "prompt_field", "response_field")
"""`load_examples`' column options; recipes' `data:`, `measure`'s options and provenance records use the same names."""
CHAT_FIELDS = DATA_FIELDS[3:]


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None = None
    target: str | None = None
    messages: Turns | None = None
    """A conversation, rendered into `text` by the tokenizer's chat template (`regmean.io.chat.render_chat`)."""
    templated: bool = False
    """`text` came from a chat template, which writes the special tokens itself: tokenise without adding them."""


COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def read_table(path: str | Path) -> pd.DataFrame:
    """The file's rows (at least one); texts stay as written (no number, date or "NA" parsing)."""
    table = _read_table(Path(path))
    if len(table) == 0 or len(table.columns) == 0:
        raise RegmeanError(f"{path}: no rows (the file is empty or blank); give a data file with examples")
    return table


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        exists = path.exists() or path.is_symlink()
        why = "not a regular file (a folder, a pipe or a link that leads nowhere)" if exists else "data file not found"
        raise RegmeanError(f"{path}: {why}; give a data file")
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION else ""
    opener, opener_name = COMPRESSION.get(compressed, open), compressed and f" compressed with {compressed[1:]}"
    kind = suffixes[-1] if suffixes else ""
    try:
        if kind in (".jsonl", ".ndjson", ".json"):
            with opener(path, "rt", encoding="utf-8-sig") as f:
                rows = json.load(f) if kind == ".json" else _json_lines(f, path)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise RegmeanError(f"{path}: expected a list of objects, one per example")
            return pd.DataFrame(rows, dtype=object)
        if kind in (".csv", ".tsv"):
            with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
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


def text_cell(value, path: str | Path, field: str, number: int) -> str | None:
    """A text cell as measure and evaluate read it: a string (None when empty or missing); a number, list or
    object is refused."""
    if isinstance(value, str):
        return value or None
    if value is None or (isinstance(value, float) and math.isnan(value)):  # missing
        return None
    raise RegmeanError(f"{path}: row {number}: {field!r} is a {type(value).__name__}, not text; write it as a string")


MAX_LINE = 64 * 1024**2
"""Characters one JSONL line (one example) may hold: longer ones are refused before they are read whole."""


def _json_lines(stream, path: Path) -> list:
    """Each non-blank line of a JSONL stream parsed, a failure naming its line; no line read past `MAX_LINE`."""
    rows = []
    for number in itertools.count(1):
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return rows
        if len(line) > MAX_LINE and not line.endswith("\n"):
            raise RegmeanError(f"{path}: line {number} is longer than {MAX_LINE:,} characters; split or shorten it")
        if line.strip():
            try:
                rows.append(json.loads(line))
                if "\\ud" in line.lower():  # an escaped surrogate: valid JSON, but only in a pair is it Unicode
                    json.dumps(rows[-1], ensure_ascii=False).encode("utf-8")
            except json.JSONDecodeError as exc:
                raise RegmeanError(f"{path}: line {number} is not JSON ({exc.msg}, column {exc.colno})") from None
            except UnicodeEncodeError:
                raise RegmeanError(
                    f"{path}: line {number} holds a lone surrogate (\\ud800-\\udfff), not Unicode text"
                ) from None


def _check_options(path, columns: list) -> None:
    """The path and the column options (`DATA_FIELDS`, in order) of the kinds they must be, and chat's together."""
    check_path(path, "load_examples reads a data file")
    for number, (name, field) in enumerate(zip(DATA_FIELDS, columns, strict=True)):
        check_text(field, name, optional=number > 0)
    _, _, _, messages_field, prompt_field, response_field = columns
    if (prompt_field is None) != (response_field is None):
        raise RegmeanError("give --prompt-field and --response-field together (a prompt and its response)")
    if messages_field and prompt_field:
        raise RegmeanError("give either --messages-field or --prompt-field/--response-field, not both")


def load_examples(
    path: str | Path,
    text_field: str = "text",
    text_pair_field: str | None = None,
    target_field: str | None = None,
    max_examples: int | None = None,
    messages_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
) -> list[Example]:
    """Rows with an empty or missing text are skipped; the first `max_examples` remaining rows are kept.

    Chat data instead of plain text: `messages_field` (a list of {role, content} per row), or `prompt_field` and
    `response_field` (a user turn and the assistant's answer; their plain concatenation is the fallback text for a
    tokenizer without a chat template). Either is rendered later by `render_chat`.
    """
    _check_options(path, [text_field, text_pair_field, target_field, messages_field, prompt_field, response_field])
    if max_examples is not None:
        check_whole_number(max_examples, "max_examples", "examples")
    table = read_table(path)
    chat = [messages_field] if messages_field else [prompt_field, response_field] if prompt_field else []
    fields = chat or [text_field, text_pair_field, target_field]
    for field in fields:
        if field is not None and field not in table.columns:
            raise RegmeanError(f"{path}: no column {field!r}; columns are {', '.join(map(str, table.columns))}")

    def cell(row, field, number):
        return None if field is None else text_cell(row[field], path, field, number)

    def example(row, number) -> Example | None:
        if messages_field:
            value = row[messages_field]
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            return None if missing else Example("", messages=read_turns(value, f"{path}: row {number}"))
        if prompt_field:
            prompt, response = cell(row, prompt_field, number), cell(row, response_field, number)
            if not prompt or not response:
                return None
            return Example(f"{prompt}\n{response}", messages=(("user", prompt), ("assistant", response)))
        text = cell(row, text_field, number)
        if not text or not text.strip():
            return None
        pair = cell(row, text_pair_field, number) or ("" if text_pair_field else None)
        return Example(text, pair, cell(row, target_field, number))

    examples = []
    for number, (_, row) in enumerate(table.iterrows(), start=1):
        made = example(row, number)
        if made is not None:
            examples.append(made)
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        named = messages_field or (f"{prompt_field}/{response_field}" if prompt_field else text_field)
        raise RegmeanError(f"{path}: no non-empty {named!r} values")
    return examples
