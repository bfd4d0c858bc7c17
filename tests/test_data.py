"""Local data files: every format gives the same examples, texts exactly as written."""

import bz2
import gzip
import json

import pandas as pd
import pytest

from regmean.errors import RegmeanError
from regmean.io.data import Example, load_examples

ROWS = [
    {"text": "007", "pair": "NA", "target": "null"},  # no number or missing-value parsing
    {"text": "2020-01-01", "pair": "1e3", "target": "True"},  # no dates, floats or booleans
    {"text": "", "pair": "x", "target": "y"},  # empty text: skipped
    {"text": 'a, "quoted"\tline', "pair": "", "target": ""},  # separators inside a field
    {"text": "last one", "pair": "p", "target": "t"},
]
EXPECTED = [
    Example("007", "NA", "null"),
    Example("2020-01-01", "1e3", "True"),
    Example('a, "quoted"\tline', "", None),
    Example("last one", "p", "t"),
]


def write(path, rows):
    frame = pd.DataFrame(rows)
    name = path.name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    elif ".csv" in name or ".tsv" in name:
        frame.to_csv(path, sep="\t" if ".tsv" in name else ",", index=False)
    else:
        text = json.dumps(rows) if ".json" in name and ".jsonl" not in name else "\n".join(map(json.dumps, rows))
        data = text.encode()
        path.write_bytes(
            gzip.compress(data) if name.endswith(".gz") else bz2.compress(data) if name.endswith(".bz2") else data
        )
    return path


@pytest.mark.parametrize(
    "name", ["d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet", "d.jsonl.gz", "d.json.bz2", "d.csv.gz"]
)
def test_every_format_gives_the_texts_as_written(tmp_path, name):
    path = write(tmp_path / name, ROWS)
    got = load_examples(path, text_field="text", text_pair_field="pair", target_field="target")
    assert got == EXPECTED
    assert load_examples(path, max_examples=2) == [Example("007"), Example("2020-01-01")]


def test_json_texts_must_be_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "y": "1"}\n{"text": "b"}\n\n{"y": "2"}\n{"text": null}\n')
    assert load_examples(path, target_field="y") == [Example("a", None, "1"), Example("b")]
    # a number, list or object is not a text (it would be measured as its Python repr): refused, naming the row
    for value, kind in (("1", "int"), ("2.5", "float"), ("true", "bool"), ('["a", "b"]', "list"), ('{"a": 1}', "dict")):
        path.write_text(f'{{"text": "fine", "y": "1"}}\n{{"text": "b", "y": {value}}}\n')
        with pytest.raises(RegmeanError, match=f"row 2: 'y' is a {kind}, not text"):
            load_examples(path, target_field="y")
        path.write_text(f'{{"text": {value}}}\n')
        with pytest.raises(RegmeanError, match=f"d.jsonl: row 1: 'text' is a {kind}, not text"):
            load_examples(path)


def test_bad_files_are_named_with_the_reason(tmp_path):
    path = write(tmp_path / "d.csv", ROWS)
    with pytest.raises(RegmeanError, match="no column 'sentence'; columns are text, pair, target"):
        load_examples(path, text_field="sentence")
    (tmp_path / "d.txt").write_text("plain text")
    with pytest.raises(RegmeanError, match="unknown data format .txt"):
        load_examples(tmp_path / "d.txt")
    (tmp_path / "o.json").write_text('{"text": "one object, not a list"}')
    with pytest.raises(RegmeanError, match="expected a list of objects"):
        load_examples(tmp_path / "o.json")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(RegmeanError, match="no non-empty 'text' values"):
        load_examples(tmp_path / "e.jsonl")
    with pytest.raises(RegmeanError, match="data file not found"):
        load_examples(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n\n"], ids=["empty", "blank"])
def test_an_empty_data_file_says_so(tmp_path, content):
    """Sweep finding E05: was "no column 'text'; columns are " (an empty list)."""
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(RegmeanError, match="no rows \\(the file is empty or blank\\)"):
        load_examples(path)


def test_a_lone_surrogate_is_named_by_line(tmp_path):
    """Final sweep F10: valid JSON, not Unicode text; was an internal error in measure and evaluate."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "bad \\ud800 text"}\n')
    with pytest.raises(RegmeanError, match="d.jsonl: line 2 holds a lone surrogate"):
        load_examples(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_a_byte_order_mark_is_read_as_editors_write_it(tmp_path, name):
    """Sweep 7: a file saved with a UTF-8 byte order mark (as some editors and spreadsheets save) was refused, or its
    first column named '\\ufefftext'; the mark is not part of the data."""
    rows = '{"text": "first"}\n{"text": "second"}\n' if name.endswith("jsonl") else "text\nfirst\nsecond\n"
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + rows.encode())
    assert [e.text for e in load_examples(tmp_path / name)] == ["first", "second"]
