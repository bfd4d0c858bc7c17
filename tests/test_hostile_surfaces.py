"""Issue 25's classes on evaluate, data, tokenizers, chat templates and memory plans: each mistake is one line
naming the file and the fix (exit 2, nothing written), and what bounds work is checked against a plain computation."""

import json
import os

import pytest
import torch
import transformers as tf
from conftest import MINILM, TEXTS, build_model, save_model, write_jsonl
from test_bad_input import cli_fails
from test_evaluate import classifier

from regmean.loading import bounded_text

GOLD = ["negative", "neutral", "positive"]


def labelled(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_rows(n: int = 6) -> list[dict]:
    return [{"text": TEXTS[i], "label": GOLD[i % 3]} for i in range(n)]


@pytest.mark.parametrize("bad", [{"a": 1}, 7, 2.5, ["x"]])
def test_evaluate_reads_texts_as_measure_does(tmp_path, bad):
    model = classifier(tmp_path / "m", 1)
    rows = plain_rows()
    rows[3]["text"] = bad
    data = labelled(tmp_path / "d.jsonl", rows)
    cli_fails(["evaluate", model, "--data", data], f"{data}: row 4: 'text' is a", "not text")


def test_evaluate_refuses_labels_that_are_not_names(tmp_path):
    model = classifier(tmp_path / "m", 1)
    rows = plain_rows()
    rows[2]["label"] = {"name": "positive"}
    data = labelled(tmp_path / "d.jsonl", rows)
    cli_fails(["evaluate", model, "--data", data], f"{data}: row 3: 'label' is a dict")


def test_evaluate_refuses_one_file_for_json_and_csv(tmp_path):
    model = classifier(tmp_path / "m", 1)
    data = labelled(tmp_path / "d.jsonl", plain_rows())
    out = tmp_path / "scores.txt"
    cli_fails(["evaluate", model, "--data", data, "--json", out, "--csv", tmp_path / "." / "scores.txt"], "both")
    assert not out.exists()


def test_evaluate_refuses_two_ids_of_one_name(tmp_path):
    model = classifier(tmp_path / "m", 1, order=["negative", "negative", "positive"])
    data = labelled(tmp_path / "d.jsonl", [{"text": t, "label": "negative"} for t in TEXTS[:4]])
    cli_fails(["evaluate", model, "--data", data], f"{model / 'config.json'}: id2label names 'negative' for 2 ids")


def test_evaluate_past_the_positions_is_one_line(tmp_path):
    model = classifier(tmp_path / "m", 1)  # 64 positions
    long = " ".join(TEXTS) * 3
    data = labelled(tmp_path / "d.jsonl", [{"text": long, "label": g} for g in GOLD])
    says = f"{model}/config.json: declares 64 positions"  # sweep 7 E05: the message named no model
    cli_fails(["evaluate", model, "--data", data, "--max-length", 512], says, "--max-length")


def short_embedding_model(tmp_path):
    """A tiny BERT whose tokenizer got two added tokens while its embedding was not resized."""
    model = build_model("bert", "BertForSequenceClassification", 1)
    path = save_model(model, tmp_path / "m")
    tok = tf.AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<new1>", "<new2>"])
    tok.save_pretrained(path)
    return path, len(tok)


def test_an_embedding_smaller_than_its_tokenizer_is_refused_before_work(tmp_path):
    path, size = short_embedding_model(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl")
    rows = tf.AutoConfig.from_pretrained(path).vocab_size
    says = f"ids up to {size - 1}, the model's embedding {rows} rows"
    cli_fails(["measure", path, "--data", data, "--out", tmp_path / "s"], says, "resize_token_embeddings")
    assert not (tmp_path / "s").exists()
    rows = [{"text": t, "label": "LABEL_0"} for t in TEXTS[:3]]
    cli_fails(["evaluate", path, "--data", labelled(tmp_path / "l.jsonl", rows)], says)


def test_max_memory_below_one_site_is_refused(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "s"
    cli_fails(["measure", path, "--data", data, "--out", out, "--max-memory", "1KB"], "--max-memory 1.0 KB", "alone")
    assert not out.exists()


def chat_model(tmp_path, template: str):
    """A tiny Llama whose tokenizer has `template`, and a one-conversation data file."""
    path = save_model(build_model("llama", "LlamaForCausalLM", 1), tmp_path / "m")
    tok = tf.AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return path, data


def test_a_template_that_renders_empty_is_named(tmp_path):
    path, data = chat_model(tmp_path, "{% for m in messages %}{% endfor %}")
    out = tmp_path / "s"
    cli_fails(["measure", path, "--data", data, "--messages-field", "messages", "--out", out], "rendered", "empty")
    assert not out.exists()


@pytest.mark.parametrize("tokenizer", ["minilm", "gpt2-bytes"])
def test_a_bounded_text_tokenises_like_the_whole_text(tokenizer):
    """Truncated to max_length, the prefix bounded_text keeps gives exactly the whole text's tokens (checked on
    texts of many lengths and word shapes), and a 10 MB line is cut to a few kilobytes."""
    tok = tf.AutoTokenizer.from_pretrained(MINILM)
    if tokenizer == "gpt2-bytes":
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(), pad_token="<pad>")
    gen = torch.Generator().manual_seed(0)
    words = [*" ".join(TEXTS).split(), "supercalifragilistic" * 20, "!!!", "ünïcödé", "\n\n"]
    for trial in range(40):
        count = int(torch.randint(1, 3000, (1,), generator=gen))
        picks = torch.randint(0, len(words), (count,), generator=gen)
        text = " ".join(words[i] for i in picks)
        for max_length in (8, 32, 128):
            whole = tok(text, truncation=True, max_length=max_length)["input_ids"]
            bounded = tok(bounded_text(tok, text, max_length), truncation=True, max_length=max_length)["input_ids"]
            assert bounded == whole, (trial, max_length)
    huge = "word " * 2_000_000
    assert len(bounded_text(tok, huge, 32)) <= 32 * 16 * 4
    unbroken = "a" * 60_000_000  # one unknown token however long (sweep X05: minutes and 9.5 GB before)
    kept = bounded_text(tok, unbroken, 32)
    assert len(kept) <= 32 * 1024
    short = "a" * 40_000
    assert (
        tok(kept, truncation=True, max_length=32)["input_ids"]
        == tok(short, truncation=True, max_length=32)["input_ids"]
    )


def _byte_bpe():
    """A small byte-level BPE tokenizer trained here (no download): GPT-2's kind of pre-tokenisation."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"])
    bpe.train_from_iterator(TEXTS * 10, trainer)
    return bpe


def test_evaluate_refuses_rows_without_a_label(tmp_path):
    model = classifier(tmp_path / "m", 1)
    rows = plain_rows()
    rows[4]["label"] = None
    del rows[1]["label"]
    data = labelled(tmp_path / "d.jsonl", rows)
    cli_fails(["evaluate", model, "--data", data], f"{data}: row 2 has a text but no 'label'")


def test_evaluate_refuses_id2label_ids_that_are_not_the_head_outputs(tmp_path):
    model = classifier(tmp_path / "m", 1)
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "neutral", "7": "positive"}
    (model / "config.json").write_text(json.dumps(config))
    data = labelled(tmp_path / "d.jsonl", plain_rows())
    cli_fails(["evaluate", model, "--data", data], "id2label ids [0, 1, 7] are not 0 to 2")


def test_evaluate_refuses_a_model_with_nan_logits(tmp_path):
    model = build_model("bert", "BertForSequenceClassification", 1)
    model.config.id2label = dict(enumerate(GOLD))
    model.config.label2id = {n: i for i, n in enumerate(GOLD)}
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    path = tmp_path / "m"
    model.save_pretrained(path, safe_serialization=True)
    tf.AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)
    data = labelled(tmp_path / "d.jsonl", plain_rows())
    cli_fails(["evaluate", path, "--data", data], "NaN or Inf logits on 6 of 6 examples")


@pytest.mark.parametrize("command", ["measure", "evaluate"])
def test_a_max_length_the_special_tokens_fill_is_refused(tmp_path, command):
    model = classifier(tmp_path / "m", 1)
    data = labelled(tmp_path / "d.jsonl", plain_rows())
    args = ["--data", data, "--max-length", 2] + (["--out", tmp_path / "s"] if command == "measure" else [])
    cli_fails([command, model, *args], "--max-length 2 leaves no room for text after the tokenizer's 2 special")
    assert not (tmp_path / "s").exists()


def test_evaluate_checks_the_score_files_folder_before_the_work(tmp_path):
    model = classifier(tmp_path / "m", 1)
    data = labelled(tmp_path / "d.jsonl", plain_rows())
    cli_fails(["evaluate", model, "--data", data, "--json", tmp_path / "no" / "s.json"], "does not exist")


def test_data_files_name_the_line_and_bound_it(tmp_path, monkeypatch):
    from regmean.errors import RegmeanError
    from regmean.io import data as data_module
    from regmean.io.data import load_examples

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(RegmeanError, match="bad.jsonl: line 4 is not JSON"):
        load_examples(bad)
    monkeypatch.setattr(data_module, "MAX_LINE", 100)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 500}) + "\n")
    with pytest.raises(RegmeanError, match="long.jsonl: line 2 is longer than 100 characters"):
        load_examples(long)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    for path in (fifo, loop, tmp_path):
        with pytest.raises(RegmeanError, match="not a regular file"):
            load_examples(path)


def test_a_template_that_never_ends_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr("regmean.io.chat.TEMPLATE_SECONDS", 1)
    path, data = chat_model(
        tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    )
    args = ["--data", data, "--messages-field", "messages"]
    cli_fails(["measure", path, *args, "--out", tmp_path / "s"], "the chat template took over 1 s")
    cli_fails(["evaluate", path, *args], "the chat template took over 1 s")
    assert not (tmp_path / "s").exists()


def test_a_template_that_allocates_without_bound_is_stopped_before_it_takes_the_memory(tmp_path, monkeypatch):
    """Sweep finding F16: a template rendering 8 GB ('x' * 8e9) is refused as it allocates (the address space
    capped at the process's size plus TEMPLATE_MEMORY), not after; the process peaks far below the 8 GB."""
    import resource

    monkeypatch.setattr("regmean.io.chat.TEMPLATE_MEMORY", 256 * 1024**2)
    path, data = chat_model(tmp_path, "{{ 'x' * 8000000000 }}")
    before = resource.getrlimit(resource.RLIMIT_AS)
    args = ["--data", data, "--messages-field", "messages", "--out", tmp_path / "s"]
    cli_fails(["measure", path, *args], "the chat template took more than 268.4 MB rendering conversation 1")
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # the cap is lifted again
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 6 * 1024**2  # KiB: never near the 8 GB
    assert not (tmp_path / "s").exists()


def test_a_config_whose_labels_do_not_fit_the_head_names_the_tensor_and_shapes(tmp_path):
    """Sweep finding F25: id2label of 5 over a head of 3 rows was transformers' 'look at the above report' (no
    report shown); now the tensor, both shapes and the fix, in measure and evaluate."""
    path = save_model(build_model("bert", "BertForSequenceClassification", 3), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {str(i): f"l{i}" for i in range(5)}
    config["label2id"] = {f"l{i}": i for i in range(5)}
    (path / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a b c", "label": "l1"}) + "\n")
    says = ("tensor classifier.bias is [3] in the checkpoint but config.json makes it [5]", "make config.json match")
    cli_fails(["measure", path, "--data", data, "--out", tmp_path / "s"], *says)
    cli_fails(["evaluate", path, "--data", data], *says)
    assert not (tmp_path / "s").exists()


def test_heads_keep_without_a_head_is_refused(tmp_path):
    from test_bad_input import merge_fails
    from test_merge import make_models

    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", stats=False)
    recipe = {"method": "average", "models": models, "heads": "keep", "head_modules": ["nothing_named_so"]}
    merge_fails(tmp_path, recipe, "names no head module")


def test_a_merge_whose_tokenizer_passes_the_embedding_is_refused(tmp_path):
    from test_bad_input import merge_fails
    from test_merge import make_models

    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", stats=False)
    for m in models:
        tok = tf.AutoTokenizer.from_pretrained(m["path"])
        tok.add_tokens(["<new1>", "<new2>"])  # the embeddings are not resized
        tok.save_pretrained(m["path"])
    merge_fails(tmp_path, {"method": "average", "models": models}, "the tokenizer has ids up to", "resize")


def test_the_card_and_the_console_name_the_tokenizer_and_the_models_without_one(tmp_path):
    from pathlib import Path

    from test_merge import make_models, run, write_config

    from regmean.loading import VOCABULARY_FILES

    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", stats=False)
    for k in (0, 2):
        for pattern in VOCABULARY_FILES:
            for file in Path(models[k]["path"]).glob(pattern):
                file.unlink()
    result = run("merge", write_config(tmp_path, method="average", models=models), tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert f"config from `{models[0]['path']}`, which has no tokenizer files: this folder has none" in card
    assert f"their vocabulary unchecked: `{models[0]['path']}`, `{models[2]['path']}`" in card
    said = " ".join(result.output.split())
    assert "2 model(s) without tokenizer files, their vocabulary unchecked" in said
    assert f"{models[0]['path']}, {models[2]['path']}" in said
