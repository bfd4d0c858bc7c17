"""Bad input: a clear one-line error per problem, a non-zero exit, inputs untouched, no output folder left."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from conftest import ALL_SITES, MINILM, TEXTS, build_model, save_model, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merge import make_models, write_config
from typer.testing import CliRunner

from regmean.cli import app
from regmean.errors import RegmeanError
from regmean.io.data import Example, load_examples
from regmean.measure import measure
from regmean.stats import StatisticsFile

runner = CliRunner()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def trio(tmp_path):
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification")
    return tmp_path, models


def cli_fails(args, *expected, code=2):
    """The CLI exits `code` with only `error: ` lines (each naming what is expected), never a traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors, result.output
    for text in expected:
        assert any(text in line for line in errors), (text, result.output)
    return errors


def merge_fails(tmp_path: Path, recipe: dict, *expected: str, out_name: str = "out"):
    config = write_config(tmp_path, **recipe)
    before = snapshot(tmp_path / "in")
    errors = cli_fails(["merge", config, tmp_path / out_name], *expected)
    assert snapshot(tmp_path / "in") == before
    assert not (tmp_path / out_name).exists()
    assert not list(tmp_path.glob(f".{out_name}.*"))  # no staging folder, no lock file
    return errors


def test_mismatched_architectures(trio):
    tmp_path, models = trio
    other = save_model(build_model("roberta", "RobertaForSequenceClassification", 1), tmp_path / "in" / "rob")
    models[1] = {"path": str(other), "statistics": models[1]["statistics"]}
    merge_fails(tmp_path, {"method": "average", "models": models}, "architecture RobertaForSequenceClassification")


def test_mismatched_shapes(tmp_path):
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", num_labels=(3, 3, 5))
    errors = merge_fails(tmp_path, {"method": "regmean", "models": models}, "shape of classifier.", "heads: keep")
    assert len(errors) == 1


def test_statistics_of_another_model(trio):
    tmp_path, models = trio
    models[0]["statistics"], models[1]["statistics"] = models[1]["statistics"], models[0]["statistics"]
    errors = merge_fails(tmp_path, {"method": "regmean", "models": models}, "measured on another model")
    assert len(errors) == 2  # both problems reported at once


def test_nan_in_statistics(trio):
    tmp_path, models = trio
    path = Path(models[2]["statistics"]) / "statistics.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("::gram_upper"))
    tensors[key][0] = float("nan")
    save_file(tensors, path, metadata=meta)
    merge_fails(tmp_path, {"method": "regmean", "models": models}, "NaN or Inf")


def test_truncated_safetensors(trio):
    tmp_path, models = trio
    weights = Path(models[1]["path"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    merge_fails(tmp_path, {"method": "average", "models": models}, "model.safetensors")


def test_missing_model_file(trio):
    tmp_path, models = trio
    (Path(models[0]["path"]) / "model.safetensors").unlink()
    merge_fails(tmp_path, {"method": "average", "models": models}, "no model weights")


def test_missing_statistics(trio):
    tmp_path, models = trio
    del models[2]["statistics"]
    merge_fails(tmp_path, {"method": "regmean", "models": models}, "needs statistics")


def test_unknown_config_keys_are_all_reported(trio):
    tmp_path, models = trio
    recipe = {"method": "regmean", "models": models, "optoins": {}, "options": {"alpah": 0.5}}
    merge_fails(tmp_path, recipe, "optoins: unknown key", "alpah")
    # with a missing model folder too: reported in the same run
    models[2] = {**models[2], "path": str(tmp_path / "in" / "gone")}
    errors = merge_fails(tmp_path, recipe, "optoins: unknown key", "alpah", "gone: not found")
    assert len(errors) == 3


def test_bad_option_value(trio):
    tmp_path, models = trio
    merge_fails(tmp_path, {"method": "regmean", "models": models, "options": {"alpha": 1.5}}, "alpha")


def test_pickle_checkpoint_refused_unless_allowed(trio):
    tmp_path, models = trio
    model = build_model("bert", "BertForSequenceClassification", 9)
    pkl = tmp_path / "in" / "pickled"
    pkl.mkdir()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(pkl)
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    tf.AutoTokenizer.from_pretrained(MINILM).save_pretrained(pkl)
    models[1] = {"path": str(pkl)}
    merge_fails(tmp_path, {"method": "average", "models": models}, "pickle checkpoint refused", "allow_pickle")
    config = write_config(tmp_path, method="average", models=models, allow_pickle=True)
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output

    # measuring it: refused the same way, unless --allow-pickle; then the same statistics as from safetensors
    data = write_jsonl(tmp_path / "d.jsonl")
    args = ["measure", str(pkl), "--data", str(data), "--stats-dtype", "float64", "--expose-token-counts"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "--allow-pickle" in result.output and not (tmp_path / "s").exists()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "s"), "--allow-pickle"]).exit_code == 0
    safe = save_model(model, tmp_path / "safe")
    reference = measure(safe, [Example(t) for t in TEXTS], stats_dtype="float64", progress=False, protection=ALL_SITES)
    got = StatisticsFile(tmp_path / "s")
    assert got.fingerprint == reference.fingerprint
    for name, site in reference.sites.items():
        torch.testing.assert_close(got.site(name).gram, site.gram)


def test_existing_output_folder_needs_force(trio):
    tmp_path, models = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    config = write_config(tmp_path, method="average", models=models)
    result = runner.invoke(app, ["merge", str(config), str(out)])
    assert result.exit_code != 0 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only a folder a merge wrote: here it says what it would have deleted, and deletes nothing
    result = runner.invoke(app, ["merge", str(config), str(out), "--force"])
    assert result.exit_code == 2 and "keep.txt" in result.output and "nothing was deleted" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    assert runner.invoke(app, ["merge", str(config), str(out)]).exit_code == 0
    first = snapshot(out)
    assert runner.invoke(app, ["merge", str(config), str(out)]).exit_code == 2  # not empty now: needs --force
    assert runner.invoke(app, ["merge", str(config), str(out), "--force"]).exit_code == 0
    assert snapshot(out).keys() == first.keys()


def test_measure_bad_input(tmp_path):
    model = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"sentence": "hello"}\n')
    good = write_jsonl(tmp_path / "good.jsonl")

    def measure_fails(model_dir, data_file, expected: list[str], *flags):
        before = snapshot(tmp_path)
        cli_fails(["measure", model_dir, "--data", data_file, "--out", tmp_path / "s", *flags], *expected)
        assert snapshot(tmp_path) == before  # inputs untouched, nothing written (no statistics, no lock file)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "good.jsonl", "m"]

    measure_fails(model, data, ["no column 'text'", "sentence"])
    measure_fails(tmp_path / "nope", good, ["nope: model folder not found"])
    measure_fails(model, good, ["device 'cuda:99': "], "--device", "cuda:99")  # no such GPU here (or no CUDA)
    measure_fails(model, good, ["not a device name"], "--device", "gpu")
    measure_fails(model, good, ["stats dtype 'float16'"], "--stats-dtype", "float16")
    with pytest.raises(RegmeanError, match="max_examples 0: a whole number of examples, at least 1"):
        load_examples(good, max_examples=0)
    (model / "tokenizer.json").unlink()  # transformers would tokenize every word as [UNK]
    measure_fails(model, good, ["no tokenizer vocabulary"])


def test_yaml_paths_are_relative_to_the_config(trio):
    tmp_path, models = trio
    rel = [
        {
            "path": str(Path(m["path"]).relative_to(tmp_path)),
            "statistics": str(Path(m["statistics"]).relative_to(tmp_path)),
        }
        for m in models
    ]
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"method": "regmean", "models": rel}))
    elsewhere = tmp_path / "in"
    result = runner.invoke(app, ["merge", str(config), str(elsewhere / "merged")])
    assert result.exit_code == 0, result.output


def test_checkpoint_missing_a_tensor_is_refused_not_initialised(trio):
    """transformers would initialise an absent tensor at random: measure and merge refuse such a checkpoint."""
    tmp_path, models = trio
    for m in models:  # every model stores the layer under a legacy name
        path = Path(m["path"]) / "model.safetensors"
        sd = load_file(path)
        sd["bert.encoder.layer.0.output.dense.kernel"] = sd.pop("bert.encoder.layer.0.output.dense.weight")
        save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(RegmeanError, match="lacks 1 tensors BertForSequenceClassification needs.*dense.weight"):
        measure(models[0]["path"], [Example("a legacy checkpoint")], progress=False)
    merge_fails(
        tmp_path, {"method": "average", "models": models}, "needs, e.g. bert.encoder.layer.0.output.dense.weight"
    )


def test_different_tokenizers_are_refused_naming_the_first_conflicting_id(tmp_path):
    """Vocabularies of different sizes merge only when one grew from the other by added tokens: a model with
    another tokenizer (one token renamed) is refused, naming an id the two read as different tokens."""
    models = make_models(tmp_path / "in", "llama", "LlamaForCausalLM", stats=False)
    config = tf.LlamaConfig.from_pretrained(models[1]["path"])
    config.vocab_size = 32000
    other = tmp_path / "in" / "other"
    tf.LlamaForCausalLM(config).save_pretrained(other)
    tokenizer = json.loads((MINILM / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    renamed = next(token for token, i in vocab.items() if i == 1000)
    vocab["zzz"] = vocab.pop(renamed)  # id 1000 names another token
    tf.AutoTokenizer.from_pretrained(MINILM).save_pretrained(other)
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    models[1] = {"path": str(other)}
    errors = merge_fails(
        tmp_path, {"method": "average", "models": models}, "token id 1000 is 'zzz'", "the tokenizers differ"
    )
    assert len(errors) == 1


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_base_model_of_other_shapes_is_refused_before_any_work(tmp_path, method):
    """A base model whose vocabulary differs: refused from the headers (merged by row blocks, its last block would
    otherwise read past the end of the base tensor)."""
    models = make_models(tmp_path / "in", "llama", "LlamaForCausalLM", stats=False)
    config = build_model("llama", "LlamaForCausalLM", seed=0).config
    config.vocab_size -= 3
    base = save_model(tf.LlamaForCausalLM(config), tmp_path / "in" / "base")
    recipe = {"method": method, "models": models, "base_model": str(base)}
    merge_fails(tmp_path, recipe, "base: shape of model.embed_tokens.weight is (30519, 16), the models' is (30522, 16)")


def test_rows_outside_a_tensor_are_refused(trio):
    from regmean.io.checkpoint import Checkpoint

    _, models = trio
    ckpt = Checkpoint(models[0]["path"])
    key = "bert.embeddings.word_embeddings.weight"
    assert ckpt.get(key, (30520, 30522)).shape == (2, 16)
    with pytest.raises(RegmeanError, match="rows 30520:30525"):
        ckpt.get(key, (30520, 30525))


def test_out_of_memory_advises_only_options_the_command_has(tmp_path, monkeypatch):
    """Sweep 6 R5: every command's out-of-memory line advised --batch-size and --dry-run, which most lack."""
    import importlib

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(importlib.import_module("regmean.merge"), "merge", exhausted)
    monkeypatch.setattr(importlib.import_module("regmean.combine"), "combine", exhausted)
    (recipe := tmp_path / "r.yaml").write_text("method: average\nmodels: [{path: a}, {path: b}]\n")
    (said,) = cli_fails(["merge", recipe, tmp_path / "out"], "out of memory; nothing was written")
    assert "see the plan with --dry-run" in said and "--batch-size" not in said
    (tmp_path / "s").mkdir()
    (said,) = cli_fails(["stats", "combine", tmp_path / "s", tmp_path / "s", "--out", tmp_path / "c"], "out of memory")
    assert said == "error: out of memory; nothing was written"
