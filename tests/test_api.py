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
