"""The statistics card measure writes beside its statistics: what it says, and that it replaces only its own."""

import json

import yaml
from conftest import build_model, save_model, write_jsonl
from safetensors import safe_open
from test_merge import run


def measured(tmp_path, *extra):
    model = tmp_path / "model"
    if not model.exists():
        save_model(build_model("bert", "BertForSequenceClassification"), model)
    data = write_jsonl(tmp_path / "data.jsonl")
    return run("measure", model, "--data", data, "--out", tmp_path / "stats", "--max-length", 32, *extra)


def test_card_describes_the_statistics(tmp_path):
    result = measured(tmp_path)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "stats" / "README.md").read_text()
    with safe_open(tmp_path / "stats" / "statistics.safetensors", "pt") as f:
        meta = f.metadata()
    fingerprint = json.loads(meta["fingerprint"])
    assert fingerprint["weights"] in card and fingerprint["architecture"] in card
    assert f"{int(meta['examples']):,} examples, {int(meta['tokens']):,} tokens" in card
    assert "| data.jsonl | text: `text` |" in card and "| 32 | float32 | 1 |" in card
    assert f"  - path: {tmp_path / 'model'}\n    statistics: {tmp_path / 'stats'}\n" in card
    assert "float32" in card and "version 2" in card
    front = yaml.safe_load(card.split("---\n")[1])  # the Hub's metadata
    assert front == {
        "base_model": str(tmp_path / "model"),
        "tags": ["regmean", "merge-statistics"],
        "statistics_format": "regmean.gram version 2",
        "protection": front["protection"],
    }
    assert front["protection"].startswith("withheld token sites: ")  # measure's default
    for text in ("flight", "patriots"):  # no word of the data
        assert text not in card


def test_force_replaces_our_card_and_never_the_users(tmp_path):
    assert measured(tmp_path).exit_code == 0
    card = tmp_path / "stats" / "README.md"
    card.write_text(card.read_text().replace("merge-statistics", "stale"))
    assert measured(tmp_path, "--force").exit_code == 0
    assert "stale" not in card.read_text()
    card.write_text("# my own notes\n")
    result = measured(tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert card.read_text() == "# my own notes\n"
    assert "not written by regmean; left as it is" in result.output


def test_failed_measure_leaves_no_card(tmp_path):
    save_model(build_model("bert", "BertForSequenceClassification"), tmp_path / "model")
    result = measured(tmp_path, "--include", "no-such-module")
    assert result.exit_code != 0
    assert not (tmp_path / "stats").exists()
