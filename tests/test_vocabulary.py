"""Grown vocabularies: models whose tokenizers got added tokens (add_tokens + resize_token_embeddings) merge; shared
rows as usual, added rows averaged over the models that have them (or taken from tokenizer_source), checked against
the rule written plainly here; tokenizers that disagree on a shared id are refused."""

from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import MINILM, VOCAB, build_model, write_jsonl
from safetensors.torch import load_file
from test_bad_input import merge_fails
from test_merge import run, write_config

ADDED = (["<tool>", "<think>"], ["<tool>"], [])  # model 0 has two added tokens, model 1 one, model 2 none


def grown_model(root: Path, k: int, added: list[str], tied: bool = False, pad_to: int | None = None) -> Path:
    """A tiny untied Llama (own LM head) fine-tune whose tokenizer got `added` and whose embeddings were resized."""
    config = build_model("llama", "LlamaForCausalLM").config
    config.tie_word_embeddings = tied
    torch.manual_seed(1234)
    model = tf.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(k + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tok = tf.AutoTokenizer.from_pretrained(MINILM)
    tok.add_tokens(added)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to, mean_resizing=False)
    with torch.no_grad():  # the added rows: distinct values per model
        for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            t[VOCAB:] = torch.randn(t[VOCAB:].shape, generator=gen)
    path = root / f"m{k}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def measured(root: Path, path: Path) -> Path:
    data = write_jsonl(root / "data.jsonl")
    out = root / f"stats-{path.name}"
    result = run("measure", path, "--data", data, "--out", out, "--max-length", 32)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("method", ["average", "regmean"])
def test_added_rows_are_averaged_over_the_models_that_have_them(tmp_path, method):
    paths = [grown_model(tmp_path, k, added) for k, added in enumerate(ADDED)]
    weights = [1.0, 2.0, 3.0]
    models = [{"path": str(p), "weight": w} for p, w in zip(paths, weights, strict=True)]
    if method == "regmean":
        for m, p in zip(models, paths, strict=True):
            m["statistics"] = str(measured(tmp_path, p))
    result = run("merge", write_config(tmp_path, method=method, models=models), tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    states = [load_file(p / "model.safetensors") for p in paths]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[key].shape == (VOCAB + 2, 16)
        shared = sum(w * s[key][:VOCAB] for w, s in zip(weights, states, strict=True)) / sum(weights)
        torch.testing.assert_close(out[key][:VOCAB], shared, rtol=1e-6, atol=1e-6)
        tool = (1.0 * states[0][key][VOCAB] + 2.0 * states[1][key][VOCAB]) / 3.0  # models 0 and 1 have <tool>
        torch.testing.assert_close(out[key][VOCAB], tool, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[key][VOCAB + 1], states[0][key][VOCAB + 1], rtol=0, atol=0)  # <think>: one
    merged_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(merged_tok) == VOCAB + 2 and merged_tok.convert_tokens_to_ids("<think>") == VOCAB + 1
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads: config and shapes agree
    assert model.config.vocab_size == VOCAB + 2
    assert "added rows averaged over the models with them" in (tmp_path / "out" / "README.md").read_text()


def test_tokenizer_source_gives_the_added_rows(tmp_path):
    paths = [grown_model(tmp_path, k, added) for k, added in enumerate(ADDED)]
    models = [{"path": str(p)} for p in paths]
    config = write_config(tmp_path, method="average", models=models, tokenizer_source=str(paths[1]))
    result = run("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out, own = load_file(tmp_path / "out" / "model.safetensors"), load_file(paths[1] / "model.safetensors")
    torch.testing.assert_close(out["lm_head.weight"][VOCAB], own["lm_head.weight"][VOCAB], rtol=0, atol=0)


def test_tied_embeddings_grow_too(tmp_path):
    """Tied embeddings (one stored tensor, read as the LM head too) follow the same rows rule, the output stays tied
    (no lm_head tensor written), and the merged model's head is its embedding."""
    paths = [grown_model(tmp_path, k, added, tied=True) for k, added in enumerate(ADDED[:2])]
    result = run(
        "merge", write_config(tmp_path, method="average", models=[{"path": str(p)} for p in paths]), tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "o" / "model.safetensors")
    states = [load_file(p / "model.safetensors") for p in paths]
    key = "model.embed_tokens.weight"
    assert out[key].shape == (VOCAB + 2, 16) and "lm_head.weight" not in out
    torch.testing.assert_close(out[key][:VOCAB], (states[0][key][:VOCAB] + states[1][key][:VOCAB]) / 2)
    torch.testing.assert_close(out[key][VOCAB], (states[0][key][VOCAB] + states[1][key][VOCAB]) / 2)  # <tool>: both
    torch.testing.assert_close(out[key][VOCAB + 1], states[0][key][VOCAB + 1], rtol=0, atol=0)  # <think>: model 0
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    torch.testing.assert_close(model.lm_head.weight.detach(), out[key])


def test_a_shared_id_naming_two_tokens_is_refused(tmp_path):
    paths = [grown_model(tmp_path / "in", 0, ["<tool>"]), grown_model(tmp_path / "in", 1, ["<x>", "<y>"])]
    recipe = {"method": "average", "models": [{"path": str(p)} for p in paths]}
    merge_fails(tmp_path, recipe, f"token id {VOCAB} is '<tool>'", "'<x>'")


@pytest.mark.parametrize("method", ["average", "regmean"])
def test_same_size_vocabularies_that_number_tokens_differently_are_refused(tmp_path, method):
    """The embeddings agree in size, so no shape tells: the tokenizers are compared id by id."""
    paths = [grown_model(tmp_path / "in", 0, ["<x1>"]), grown_model(tmp_path / "in", 1, ["<y1>"])]
    models = [{"path": str(p)} for p in paths]
    if method == "regmean":
        for m, p in zip(models, paths, strict=True):
            m["statistics"] = str(measured(tmp_path / "in", p))
    recipe = {"method": method, "models": models}
    merge_fails(tmp_path, recipe, f"token id {VOCAB} is '<y1>'", "it is '<x1>'", "cannot be merged")


def test_same_vocabularies_in_different_files_merge(tmp_path):
    """Byte-different tokenizer files (another model_max_length) with the same tokens at the same ids merge."""
    paths = [grown_model(tmp_path, k, ["<tool>"]) for k in range(2)]
    tok = tf.AutoTokenizer.from_pretrained(paths[1])
    tok.model_max_length = 77
    tok.save_pretrained(paths[1])
    assert (paths[0] / "tokenizer_config.json").read_bytes() != (paths[1] / "tokenizer_config.json").read_bytes()
    config = write_config(tmp_path, method="average", models=[{"path": str(p)} for p in paths])
    result = run("merge", config, tmp_path / "o")
    assert result.exit_code == 0, result.output


def test_same_vocabularies_that_split_text_otherwise_are_refused(tmp_path):
    """One vocabulary, but one tokenizer keeps case: the same text gives other ids, so no id means one thing."""
    paths = [grown_model(tmp_path / "in", k, ["<tool>"]) for k in range(2)]
    cased = tf.AutoTokenizer.from_pretrained(MINILM, do_lower_case=False)
    cased.add_tokens(["<tool>"])
    cased.save_pretrained(paths[1])
    assert cased("Great Movie")["input_ids"] != tf.AutoTokenizer.from_pretrained(paths[0])("Great Movie")["input_ids"]
    recipe = {"method": "average", "models": [{"path": str(p)} for p in paths]}
    merge_fails(tmp_path, recipe, "splits text otherwise", "cannot be merged")


def test_methods_that_cannot_merge_grown_vocabularies_say_so(tmp_path):
    paths = [grown_model(tmp_path / "in", k, added) for k, added in enumerate(ADDED[:2])]
    base = grown_model(tmp_path / "in", 5, [])
    recipe = {"method": "ties", "models": [{"path": str(p)} for p in paths], "base_model": str(base)}
    merge_fails(tmp_path, recipe, "vocabularies differ", "method ties does not; use average or regmean")


def test_padding_rows_never_average_into_a_token(tmp_path):
    """Tables padded to a multiple of 64 (resize_token_embeddings(pad_to_multiple_of=64)): an added token's row is
    averaged only over the models whose tokenizer has it, never with another model's padding row."""
    small = grown_model(tmp_path, 2, [], pad_to=64)  # 30522 tokens in 30528 rows, listed first
    one = grown_model(tmp_path, 1, ["<tool>"])  # 30523 tokens and rows
    two = grown_model(tmp_path, 0, ["<tool>", "<think>"], pad_to=64)  # 30524 tokens in 30528 rows
    paths = [small, one, two]
    result = run(
        "merge", write_config(tmp_path, method="average", models=[{"path": str(p)} for p in paths]), tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "o" / "model.safetensors")["lm_head.weight"]
    s, o, t = (load_file(p / "model.safetensors")["lm_head.weight"] for p in paths)
    assert out.shape[0] == VOCAB + 6
    torch.testing.assert_close(out[:VOCAB], (s[:VOCAB] + o[:VOCAB] + t[:VOCAB]) / 3, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[VOCAB], (o[VOCAB] + t[VOCAB]) / 2, rtol=1e-6, atol=1e-6)  # not small's padding
    torch.testing.assert_close(out[VOCAB + 1], t[VOCAB + 1], rtol=0, atol=0)
    torch.testing.assert_close(out[VOCAB + 2 :], (s[VOCAB + 2 :] + t[VOCAB + 2 :]) / 2, rtol=1e-6, atol=1e-6)
    assert len(tf.AutoTokenizer.from_pretrained(tmp_path / "o")) == VOCAB + 2


def test_a_tokenizer_past_its_models_embedding_is_refused_whichever_model_has_it(tmp_path):
    """Sweep 5 F07: only the first model's tokenizer was checked against its embedding; a second model whose
    tokenizer got tokens its embedding never did merged silently, and those tokens vanished from the output."""
    paths = [grown_model(tmp_path / "in", k, []) for k in range(2)]
    tok = tf.AutoTokenizer.from_pretrained(paths[1])
    tok.add_tokens(["<new1>", "<new2>"])  # the embeddings not resized
    tok.save_pretrained(paths[1])
    recipe = {"method": "average", "models": [{"path": str(p)} for p in paths]}
    merge_fails(tmp_path, recipe, f"{paths[1]}: the tokenizer has ids up to {VOCAB + 1}", "resize the embeddings")
