"""No silent garbage and never a traceback: bad numbers, non-finite weights, corrupt headers and metadata, bad
indexes, configs, data files, sizes and regexes each end in one line naming the file, exit 2, nothing written."""

import bz2
import importlib
import json
import lzma
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ALL_SITES, MINILM, TEXTS, build_model, save_model, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_input import cli_fails as fails
from test_bad_input import merge_fails, snapshot
from test_merge import make_models, write_config
from typer.testing import CliRunner

from regmean.cli import app
from regmean.errors import RegmeanError
from regmean.io.data import Example, load_examples
from regmean.io.tensorfile import TensorFile
from regmean.measure import measure
from regmean.stats import StatisticsFile, save
from regmean.units import parse_size

runner = CliRunner()


@pytest.fixture
def trio(tmp_path):
    return tmp_path, make_models(tmp_path / "in", "bert", "BertForSequenceClassification")


def raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def rewrite(path: Path, metadata_change=None, tensor_change=None) -> None:
    """Re-save a safetensors file with changed metadata and/or tensors."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if metadata_change:
        metadata_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, path, metadata=meta)


# -- 2. no silent garbage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"weight": float("inf")}, "models.0.weight"),
        ({"weight": float("nan")}, "models.0.weight"),
        ({"weight": -1.0}, "greater than 0"),
        ("huge", "sum to a finite number"),
        ({"options": {"alpha": float("nan")}}, "alpha"),
        ({"method": "task_arithmetic", "options": {"scaling": float("nan")}}, "scaling"),
        ({"method": "task_arithmetic", "options": {"scaling": float("inf")}}, "scaling"),
    ],
)
def test_recipe_numbers_are_finite_and_in_range(trio, change, says):
    tmp_path, models = trio
    recipe = {"method": "average", "models": models, "base_model": models[0]["path"]}
    if change == "huge":  # each weight representable, their sum not
        recipe["models"] = [{**m, "weight": 1e308} for m in models]
    elif "weight" in change:
        recipe["models"] = [{**models[0], **change}, *models[1:]]
    else:
        recipe.update(change)
    merge_fails(tmp_path, recipe, says)


def test_a_merge_that_overflows_writes_nothing(trio, monkeypatch):
    tmp_path, models = trio
    recipe = {"method": "task_arithmetic", "models": models, "base_model": models[0]["path"]}
    merge_fails(tmp_path, {**recipe, "options": {"scaling": 1e308}}, "overflows torch.float")
    # whatever a method computes, a non-finite output tensor is never written
    average = importlib.import_module("regmean.methods.average")
    real = average.weighted_average
    monkeypatch.setattr(average, "weighted_average", lambda t, w: real(t, w) * float("inf"))
    merge_fails(tmp_path, {"method": "average", "models": models}, "merged tensor", "NaN or Inf", "nothing was written")


def test_non_finite_weights_are_refused_naming_file_and_tensor(trio):
    tmp_path, models = trio
    path = Path(models[1]["path"]) / "model.safetensors"
    key = "bert.encoder.layer.1.attention.output.LayerNorm.bias"
    rewrite(path, tensor_change=lambda t: t[key].__setitem__(0, float("nan")))
    merge_fails(tmp_path, {"method": "average", "models": models}, f"{path}: tensor {key}: has NaN or Inf")
    with pytest.raises(RegmeanError, match=f"tensor {key}: has NaN or Inf"):
        measure(models[1]["path"], [Example("x")], progress=False)
    # regmean no longer blames the statistics: the weights are named
    merge_fails(tmp_path, {"method": "regmean", "models": models}, f"tensor {key}: has NaN or Inf")


def test_negative_or_overlapping_offsets_are_refused(tmp_path):
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    cases = {
        "negative": {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        },
        "overlap": {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        },
        "gap": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
        "float": {"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}},
        "bool": {"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}},
        "past end": {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
        "trailing": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
    }
    for name, header in cases.items():
        with pytest.raises(RegmeanError, match="x.safetensors"):
            TensorFile(raw_safetensors(tmp_path / "x.safetensors", header, data))
            pytest.fail(name)


def test_fisher_needs_a_classifier_with_its_head(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl")
    lm = save_model(build_model("llama", "LlamaForCausalLM", 1), tmp_path / "lm")
    fails(["fisher", lm, "--data", data, "--out", tmp_path / "f"], "LlamaForCausalLM is not a classifier")
    clf = save_model(build_model("llama", "LlamaForSequenceClassification", 1), tmp_path / "clf")
    weights = clf / "model.safetensors"
    rewrite(weights, tensor_change=lambda t: t.pop("score.weight"))  # a classifier saved without its head
    fails(["fisher", clf, "--data", data, "--out", tmp_path / "f"], "score.weight", "at random")
    assert not (tmp_path / "f").exists()


def test_fisher_refuses_pickle_unless_allowed(tmp_path):
    model = build_model("bert", "BertForSequenceClassification", 2)
    folder = tmp_path / "pkl"
    folder.mkdir()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    import transformers as tf

    tf.AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:3], ["a", "b", "c"])
    fails(["fisher", folder, "--data", data, "--out", tmp_path / "f"], "pickle checkpoint refused", "--allow-pickle")
    result = runner.invoke(
        app, ["fisher", str(folder), "--data", str(data), "--out", str(tmp_path / "f"), "--allow-pickle"]
    )
    assert result.exit_code == 0, result.output
    fails(["fisher", folder, "--data", data, "--out", tmp_path / "f", "--allow-pickle"], "exists", "--force")


# -- 3. one line, never a traceback ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ([1, 2], "is a list, not a JSON object"),
        ({"a": "F32"}, "is a str, not an object"),
        ({"a": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
        ({"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, "__metadata__"),
        ({"__metadata__": {"k": 1}}, "__metadata__"),
        ({"a": {"dtype": "Q7", "shape": [0], "data_offsets": [0, 0]}}, "unsupported dtype"),
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_safetensors_headers_are_one_line(tmp_path, header, says):
    with pytest.raises(RegmeanError, match=says):
        TensorFile(raw_safetensors(tmp_path / "x.safetensors", header))


def test_bad_index_and_config_are_one_line(trio):
    tmp_path, models = trio
    folder = Path(models[1]["path"])
    index = folder / "model.safetensors.index.json"
    recipe = {"method": "average", "models": models}
    for text, says in (
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "no weight_map"),
        ('{"weight_map": []}', "no weight_map"),
        ('{"weight_map": {"a": "../ft0/model.safetensors"}}', "not a file name in the folder"),
        ('{"weight_map": {"a": "/etc/passwd"}}', "not a file name in the folder"),
        ('{"weight_map": {"a": 5}}', "not a file name in the folder"),
        ('{"weight_map": {"nope": "model.safetensors"}}', "lacks nope"),
    ):
        index.write_text(text)
        merge_fails(tmp_path, recipe, str(index) if "lacks" not in says else "model.safetensors", says)
    index.unlink()
    folder = Path(models[0]["path"])  # the first model's config builds the architecture
    config = folder / "config.json"
    good = config.read_bytes()
    data = write_jsonl(tmp_path / "d.jsonl")
    for raw, says in (
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"architectures": "BertModel"}', "must be a list of class names"),
        (b'{"architectures": ["NoSuchModel"], "model_type": "bert"}', "not a transformers model class"),
    ):
        config.write_bytes(raw)
        merge_fails(tmp_path, recipe, "config.json", says)
        fails(["measure", folder, "--data", data, "--out", tmp_path / "s"], "config.json")
        assert not (tmp_path / "s").exists()
    config.write_bytes(good)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("fingerprint", "{not json", "not valid JSON"),
        ("fingerprint", None, "lacks 'fingerprint'"),
        ("fingerprint", '{"weights": "x"}', "an object with architecture"),
        ("format_version", "one", "non-negative integer"),
        ("examples", "-1", "non-negative integer"),
        ("examples", "1e3", "non-negative integer"),
        ("tokens", "", "non-negative integer"),
        ("modules", '["a", "b"]', "a JSON object of strings"),
        ("modules", '{"a": 1}', "a JSON object of strings"),
        ("provenance", '{"data": "x"}', "a JSON list of flat objects"),
        ("provenance", '[{"data": {"nested": 1}}]', "a JSON list of flat objects"),
        ("provenance", "[" * 50000 + "]" * 50000, "nested too deeply"),
        ("dtype", "float16", "float32 or float64"),
        ("skipped", "7", "a JSON object of strings"),
    ],
)
def test_bad_statistics_metadata_is_one_line(tmp_path, field, value, says):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    stats_file = save(
        measure(path, [Example(t) for t in TEXTS[:3]], progress=False, protection=ALL_SITES), tmp_path / "s"
    )

    def change(meta):
        if value is None:
            del meta[field]
        else:
            meta[field] = value

    rewrite(stats_file, metadata_change=change)
    with pytest.raises(RegmeanError, match=says):
        StatisticsFile(stats_file)
    fails(["stats", "show", stats_file], says)


def test_bad_statistics_tensors_are_one_line(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    stats = measure(path, [Example(t) for t in TEXTS[:3]], progress=False, protection=ALL_SITES)
    site = stats.modules["bert.encoder.layer.0.attention.self.query"]
    original = save(stats, tmp_path / "s").read_bytes()
    cases = [
        (lambda t: t.__setitem__(f"{site}::count", torch.tensor([-5])), "negative row count"),
        (lambda t: t.pop(f"{site}::sum"), "incomplete statistics"),
        (lambda t: t.__setitem__(f"{site}::gram_upper", torch.zeros(3, 4)), "incomplete statistics"),
        (lambda t: t.__setitem__(f"{site}::count", torch.tensor([1.0])), "incomplete statistics"),
    ]
    for change, says in cases:
        (tmp_path / "s" / "statistics.safetensors").write_bytes(original)
        rewrite(tmp_path / "s" / "statistics.safetensors", tensor_change=change)
        with pytest.raises(RegmeanError, match=says):
            StatisticsFile(tmp_path / "s").site(site)


def test_block_names_and_sets_are_checked(tmp_path):
    folder = tmp_path / "blocks"
    folder.mkdir()
    (folder / "statistics-x-of-y.safetensors").write_bytes(b"")
    with pytest.raises(RegmeanError, match="not a statistics block name"):
        StatisticsFile(folder)
    (folder / "statistics-x-of-y.safetensors").unlink()
    for name in ("statistics-00001-of-00002.safetensors", "statistics-00003-of-00002.safetensors"):
        (folder / name).write_bytes(b"")
    with pytest.raises(RegmeanError, match="not blocks 1 to 2"):
        StatisticsFile(folder)


def test_bad_data_files_are_one_line(tmp_path):
    good = "\n".join(json.dumps({"text": t}) for t in TEXTS).encode()
    (tmp_path / "d.jsonl.xz").write_bytes(b"\xfd7zXZ\x00 not really xz")
    (tmp_path / "t.jsonl.gz").write_bytes(__import__("gzip").compress(good)[:-20])
    (tmp_path / "b.csv.bz2").write_bytes(bz2.compress(b"text\nfine\n")[:-5])
    (tmp_path / "n.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    (tmp_path / "p.parquet").write_bytes(b"PAR1 not parquet")
    for name, says in (
        ("d.jsonl.xz", "d.jsonl.xz: cannot read as jsonl compressed with xz"),
        ("t.jsonl.gz", "t.jsonl.gz: cannot read as jsonl compressed with gz"),
        ("b.csv.bz2", "b.csv.bz2: cannot read as csv compressed with bz2"),
        ("n.json", "n.json: cannot parse as json (nested too deeply)"),
        ("u.jsonl", "u.jsonl: cannot read as jsonl"),
        ("p.parquet", "p.parquet: cannot read as parquet"),
    ):
        with pytest.raises(RegmeanError, match=re.escape(says)):
            load_examples(tmp_path / name)
    assert lzma.decompress(lzma.compress(good)) == good  # (the xz reader itself works: see test_data)


def test_long_inputs_beyond_the_positions_are_one_line(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")  # 64 positions
    data = write_jsonl(tmp_path / "d.jsonl", [" ".join(["word"] * 300)] * 2, ["a", "b"])
    fails(["measure", path, "--data", data, "--out", tmp_path / "s", "--max-length", "500"], "64 positions")
    assert not (tmp_path / "s").exists()
    result = runner.invoke(
        app, ["measure", str(path), "--data", str(data), "--out", str(tmp_path / "s"), "--max-length", "64"]
    )
    assert result.exit_code == 0, result.output


def test_bad_regexes_sizes_and_yaml_are_one_line(trio):
    tmp_path, models = trio
    data = write_jsonl(tmp_path / "d.jsonl")
    for flag in ("--include", "--exclude"):
        fails(
            ["measure", models[0]["path"], "--data", data, "--out", tmp_path / "s", flag, "(unclosed"],
            flag,
            "invalid regular expression",
        )
    merge_fails(
        tmp_path,
        {"method": "average", "models": models, "heads": "keep", "head_modules": ["[z-a]"]},
        "head_modules",
        "invalid regular expression",
    )
    config = write_config(tmp_path, method="average", models=models)
    for flag, value in (
        ("--max-memory", "..."),
        ("--shard-size", "1.2.3GB"),
        ("--shard-size", "0"),
        ("--shard-size", "5XB"),
    ):
        fails(["merge", config, tmp_path / "out", flag, value], flag)
    fails(
        ["measure", models[0]["path"], "--data", data, "--out", tmp_path / "s", "--max-memory", "-3GB"], "--max-memory"
    )
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(".5KB") == 500
    bad = tmp_path / "bad.yaml"
    for text, says in (
        ("method: average\nmethod: regmean\nmodels: []\n", "line 2, column 1: key 'method' appears twice"),
        ("method: [unclosed\n", "not valid YAML at line"),
        ("models: 5\n", "models"),
        ("!!python/object:os.system {}\n", "not valid YAML"),
    ):
        bad.write_text(text)
        errors = fails(["merge", bad, tmp_path / "out"], says)
        assert all("\n" not in e for e in errors)
    assert not (tmp_path / "out").exists()


def test_huge_declared_tensor_is_refused_without_reading_it(trio):
    """A sparse 4 TB file whose header claims 10^12 elements: the shape mismatch is reported, nothing is hashed."""
    tmp_path, models = trio
    weights = Path(models[1]["path"]) / "model.safetensors"
    key = "bert.embeddings.word_embeddings.weight"
    with safe_open(str(weights), "pt") as f:
        header = {k: None for k in f.keys()}
    sizes = {k: t for k, t in load_file(weights).items()}
    offset, entries = 0, {}
    for k in header:
        shape = [10**6, 10**6] if k == key else list(sizes[k].shape)
        n = 4 * int(torch.tensor(shape).prod()) if shape else 4
        entries[k] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries).encode()
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        try:
            f.truncate(8 + len(text) + offset)  # sparse: no disk used
        except OSError:
            pytest.skip("this file system does not take a 4 TB sparse file")
    config = write_config(tmp_path, method="regmean", models=models)
    fails(["merge", config, tmp_path / "out"], f"shape of {key}")
    assert weights.stat().st_size == 8 + len(text) + offset and not (tmp_path / "out").exists()


# -- 4. smaller ------------------------------------------------------------------------------------------------


def test_combine_refuses_the_same_statistics_twice(trio):
    tmp_path, models = trio
    stats = Path(models[0]["statistics"])
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "statistics.safetensors").write_bytes((stats / "statistics.safetensors").read_bytes())
    fails(["stats", "combine", stats, stats, "--out", tmp_path / "c"], "the same statistics as")
    fails(["stats", "combine", stats, copy, "--out", tmp_path / "c"], f"{copy}", "the same statistics as")
    assert not (tmp_path / "c").exists()


def test_long_provenance_is_shown_bounded(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    stats = measure(path, [Example(t) for t in TEXTS[:3]], progress=False, protection=ALL_SITES)
    stats.provenance = [{"data": "x" * 100_000, "note": "[bold]not markup[/]", "esc": "\x1b[2J"}] * 100
    save(stats, tmp_path / "s")
    result = runner.invoke(app, ["stats", "show", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "and 80 more records" in result.output and len(result.output) < 20_000
    assert "[bold]not markup[/]" in result.output
    assert "\x1b" not in result.output and "esc=\\x1b[2J" in result.output  # no terminal escapes from a file


def test_every_cli_error_is_one_line_per_problem(trio):
    tmp_path, models = trio
    recipe = {"method": "regmean", "models": [{"path": "gone"}, {"path": "also gone"}], "optoins": 1}
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out")])
    lines = result.output.splitlines()
    assert result.exit_code == 2 and len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines


def test_a_defect_is_one_line_too(trio, monkeypatch):
    tmp_path, models = trio
    config = write_config(tmp_path, method="average", models=models)

    def broken(*args, **kwargs):
        raise TypeError("a defect\nover two lines")

    monkeypatch.setattr(importlib.import_module("regmean.merge.engine"), "open_inputs", broken)
    before = snapshot(tmp_path / "in")
    errors = fails(["merge", config, tmp_path / "out"], "internal error (TypeError: a defect over two lines)", code=3)
    assert len(errors) == 1 and snapshot(tmp_path / "in") == before and not (tmp_path / "out").exists()


def test_more_parser_corners_are_one_line(trio):
    tmp_path, models = trio
    bad = tmp_path / "bad.yaml"
    bad.write_text("? [a, b]\n: 1\n")
    fails(["merge", bad, tmp_path / "out"], "a key must be a plain value")
    config = write_config(tmp_path, method="average", models=models)
    fails(["merge", config, tmp_path / "out", "--shard-size", "1" * 400], "--shard-size")
    pd = importlib.import_module("pandas")
    pd.DataFrame({"text": [["a", "list"], ["b"]]}).to_parquet(tmp_path / "lists.parquet")
    with pytest.raises(RegmeanError, match="row 1: 'text' is a ndarray, not text"):
        load_examples(tmp_path / "lists.parquet")
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    stats = measure(path, [Example(t) for t in TEXTS[:3]], progress=False, protection=ALL_SITES)
    site = stats.modules["bert.encoder.layer.0.attention.self.query"]
    file = save(stats, tmp_path / "s")
    original = file.read_bytes()
    rewrite(file, metadata_change=lambda m: m.pop("format_version"))
    assert runner.invoke(app, ["stats", "show", str(file)]).exit_code == 0
    file.write_bytes(original)
    rewrite(file, tensor_change=lambda t: t.__setitem__(f"{site}::gram_upper", torch.tensor(1.0)))
    fails(["stats", "show", file], "incomplete statistics")
    assert TensorFile(raw_safetensors(tmp_path / "n.safetensors", {"__metadata__": None})).metadata == {}


def test_blocks_of_different_measures_are_refused(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    args = ["measure", str(path), "--data", str(data), "--max-memory", "3KB"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--max-examples", "4"]).exit_code == 0
    blocks = sorted((tmp_path / "a").iterdir())
    assert len(blocks) > 2
    (tmp_path / "b" / blocks[1].name).replace(blocks[1])  # as a kill in the middle of revealing the blocks would
    fails(["stats", "show", tmp_path / "a"], "a block of another measure")


def test_recipe_weights_of_any_finite_size_merge(trio):
    """Only the weights' ratios matter: 1e300 each merges as 1 each (the Grams times weights stay finite)."""
    tmp_path, models = trio
    outs = []
    for weight in (1.0, 1e300):
        entries = [{**m, "weight": weight} for m in models]
        config = write_config(tmp_path, method="regmean", models=entries)
        out = tmp_path / f"w{weight:g}"
        assert runner.invoke(app, ["merge", str(config), str(out)]).exit_code == 0
        outs.append(load_file(out / "model.safetensors"))
    for key, tensor in outs[0].items():
        torch.testing.assert_close(outs[1][key], tensor)


def test_legacy_names_and_yaml_merge_keys_still_work(trio):
    tmp_path, models = trio
    for m in models:  # an old checkpoint: LayerNorm.gamma / beta, which transformers renames when loading
        weights = Path(m["path"]) / "model.safetensors"
        legacy = {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
            for k, t in load_file(weights).items()
        }
        save_file(legacy, weights, metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"  # a YAML merge key: model 1 takes model 0's entry, with its own path
    recipe.write_text(
        f"method: average\nmodels:\n  - &first {{path: {models[0]['path']}, weight: 2}}\n"
        f"  - {{<<: *first, path: {models[1]['path']}}}\n  - {{path: {models[2]['path']}}}\n"
    )
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert [m["weight"] for m in merged["models"]] == [2, 2, 1]
    assert (tmp_path / "out" / merged["models"][1]["path"]).resolve() == Path(models[1]["path"]).resolve()


def test_usage_errors_and_empty_merges_are_refused_in_one_line(trio):
    tmp_path, models = trio
    merge_fails(
        tmp_path,
        {"method": "average", "models": models, "heads": "keep", "head_modules": [".*"]},
        "nothing would be merged",
    )
    command = [sys.executable, "-m", "regmean", "measure", models[0]["path"], "--batch-size", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: Invalid value for '--batch-size': Input should be greater than or equal to 1 "
        "(see regmean measure --help)"
    ]
