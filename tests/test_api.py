"""The Python API at the CLI's level: `dir(regmean)` lists it, `save_statistics` writes the card as `measure` does,
`evaluate` scores, `merge` returns a report whose summary is typed."""

from conftest import TEXTS, build_model, save_model, write_jsonl
from test_merge import EXAMPLES, make_models

import regmean


def test_the_api_from_measure_to_evaluate(tmp_path):
    assert {"measure", "save_statistics", "merge", "evaluate", "MergeConfig", "MergeSummary"} <= set(dir(regmean))
    model = save_model(build_model("bert", "BertForSequenceClassification"), tmp_path / "m")
    stats = regmean.measure(model, EXAMPLES, progress=False)
    assert "bert.encoder.layer.0.attention.self.query" not in stats.sites  # a token site: withheld by default
    assert "bert.encoder.layer.1.attention.self.query" in stats.sites
    path = regmean.save_statistics(stats, tmp_path / "stats")
    card = (path.parent / "README.md").read_text()
    assert "withheld token sites: bert.encoder.layer.0.attention.self.query" in card, card
    assert stats.fingerprint["weights"] in card and f"path: {model}" in card
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification")
    report = regmean.merge(regmean.MergeConfig(models=models), tmp_path / "out", progress=False)
    summary = report.summary()
    assert isinstance(summary, regmean.MergeSummary) and summary.solved_layers == 14
    labels = [f"LABEL_{k % 3}" for k in range(len(TEXTS))]  # the tiny models' own label names
    data = write_jsonl(tmp_path / "t.jsonl", TEXTS, labels)
    scores = regmean.evaluate([tmp_path / "out", model], data, progress=False)
    assert [s.model for s in scores] == [str(tmp_path / "out"), str(model)]
    assert all(0 <= s.metrics["accuracy"] <= 1 and s.examples == 10 for s in scores)


def test_the_apis_common_mistakes_are_regmean_errors(tmp_path, monkeypatch):
    """Sweep 5 F10 and sweep 6 R3: a path for examples, a dict for protection, no models, a string for a number,
    examples for evaluate's data file were tracebacks; statistics saved over a model's weights replaced them (R2);
    one folder given alone is scored, and a recipe given as a mapping is merged (paths from the working folder)."""
    import pytest

    model = save_model(build_model("bert", "BertForSequenceClassification"), tmp_path / "m")
    data = write_jsonl(tmp_path / "t.jsonl", TEXTS, [f"LABEL_{k % 3}" for k in range(len(TEXTS))])
    stats = regmean.measure(model, EXAMPLES, progress=False)
    mistakes = {
        "a list of regmean.Example": lambda: regmean.measure(model, str(data)),
        "a regmean.Protection": lambda: regmean.measure(model, EXAMPLES, protection={"epsilon": 1}),
        "no models given": lambda: regmean.evaluate([], data),
        "give a number": lambda: regmean.Protection(epsilon="1"),
        "batch_size '8'": lambda: regmean.measure(model, EXAMPLES, batch_size="8"),
        "not a list": lambda: regmean.merge([str(model)], tmp_path / "o"),
        "takes a list of statistics": lambda: regmean.combine(str(tmp_path)),
        "data is the path of a labelled data file": lambda: regmean.evaluate(model, EXAMPLES),
        "models are a list of model": lambda: regmean.evaluate([model, 3], data),
        "max_length 0: a whole number of tokens": lambda: regmean.evaluate(model, data, max_length=0),
        "max_length '32'": lambda: regmean.measure(model, EXAMPLES, max_length="32"),
        # sweep 7 B-series: TypeError, AttributeError, FileExistsError and pydantic's ValidationError escaped
        "model_dir: a path": lambda: regmean.measure(123, EXAMPLES),
        "base: a path": lambda: regmean.measure(model, EXAMPLES, base=3),
        "checkpoint_dir: a path": lambda: regmean.measure(model, EXAMPLES, checkpoint_dir=7),
        "provenance: a dict": lambda: regmean.measure(model, EXAMPLES, provenance="x"),
        "out_dir: a path": lambda: regmean.merge({"method": "average", "models": [{"path": str(model)}]}, None),
        "MergeConfig: models": lambda: regmean.MergeConfig(method="average", models=None),
        "combine's statistics: a path": lambda: regmean.combine([1, 2]),
        "load_examples reads a data file": lambda: regmean.load_examples(123),
        "max_examples '3'": lambda: regmean.load_examples(data, max_examples="3"),
        "takes the Statistics regmean.measure returns": lambda: regmean.save_statistics("x", tmp_path / "s"),
        "not a folder": lambda: regmean.save_statistics(stats, model / "config.json"),
        "withhold='no': give True or False": lambda: regmean.Protection(withhold="no"),
        # sweep 8 F09, F10: still plain exceptions, and strings taken as true
        "StatisticsFile: a path": lambda: regmean.StatisticsFile(123),
        r"examples\[0\]: its text is a int": lambda: regmean.measure(model, [regmean.Example(text=5)]),
        "log 'x': give a function": lambda: regmean.merge(str(tmp_path / "r.yaml"), "o", log="x"),
        "device None: give a string": lambda: regmean.measure(model, EXAMPLES, device=None),
        "text_field \\['text'\\]: give a string": lambda: regmean.load_examples(data, text_field=["text"]),
        "a recipe: a path": lambda: regmean.MergeConfig.from_file(123),
        "a recipe is a mapping": lambda: regmean.MergeConfig.parse("x"),
        "force 'no': give True or False": lambda: regmean.merge(str(tmp_path / "r.yaml"), "o", force="no"),
        "per_label 'no': give True or False": lambda: regmean.evaluate(model, data, per_label="no"),
    }
    for says, mistake in mistakes.items():
        with pytest.raises(regmean.RegmeanError, match=says):
            mistake()
    (scores,) = regmean.evaluate(model, data, progress=False)
    weights = (model / "model.safetensors").read_bytes()
    with pytest.raises(regmean.RegmeanError, match="not a regmean.gram file written by regmean"):
        regmean.save_statistics(regmean.measure(model, EXAMPLES, progress=False), model / "model.safetensors")
    assert (model / "model.safetensors").read_bytes() == weights  # sweep 6 R2: the weights were replaced
    (tmp_path / "pub").mkdir()
    regmean.save_statistics(stats, tmp_path / "pub" / "mine.safetensors")  # sweep 7 B51: a card came along
    assert [p.name for p in (tmp_path / "pub").iterdir()] == ["mine.safetensors"]
    assert scores.model == str(model) and scores.examples == len(TEXTS)
    save_model(build_model("bert", "BertForSequenceClassification", 2), tmp_path / "m2")
    monkeypatch.chdir(tmp_path)
    report = regmean.merge({"method": "average", "models": [{"path": "m"}, {"path": "m2"}]}, "out", progress=False)
    assert report.method == "average" and (tmp_path / "out" / "model.safetensors").is_file()
