"""Recipes and cards: the `merge_config.yaml` written into every output replays from where it lies (its paths are
relative to its own folder), giving the same bytes; the card carries the Hub's metadata, the recipe and the
citation."""

import json
import os
from pathlib import Path

import pytest
import yaml
from test_merge import make_models, run, write_config


def without_timings(report: dict) -> dict:
    """A merge report less what measures the run rather than the merge (seconds)."""
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if not k.endswith("seconds")}
    if isinstance(report, list):
        return [without_timings(v) for v in report]
    return report


def same_folders(first: Path, second: Path) -> None:
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        a, b = (first / name).read_bytes(), (second / name).read_bytes()
        if name.name == "merge_report.json":
            assert without_timings(json.loads(a)) == without_timings(json.loads(b)), name
        else:
            assert a == b, name


@pytest.mark.parametrize("heads", ["merge", "keep"])
def test_the_written_recipe_replays_to_the_same_bytes(tmp_path, heads):
    labels = (3, 2, 4) if heads == "keep" else (3, 3, 3)
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", num_labels=labels)
    relative = [{key: os.path.relpath(value, tmp_path) for key, value in m.items()} for m in models]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": relative, "heads": heads}))
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert written["models"][0]["path"] == "../in/ft0"  # relative to the recipe's own folder
    result = run("merge", tmp_path / "out" / "merge_config.yaml", tmp_path / "again")
    assert result.exit_code == 0, result.output
    same_folders(tmp_path / "out", tmp_path / "again")


def test_the_card_has_the_hubs_metadata_the_recipe_and_the_citation(tmp_path):
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification")
    result = run("merge", write_config(tmp_path, method="regmean", models=models), tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "library_name": "transformers",
        "base_model": [m["path"] for m in models],
        "base_model_relation": "merge",
        "tags": ["merge", "regmean"],
        "pipeline_tag": "text-classification",
    }
    recipe = (tmp_path / "out" / "merge_config.yaml").read_text()
    assert f"```yaml\n{recipe.rstrip()}\n```" in card
    assert "Dataless Knowledge Fusion by Merging Weights of Language Models" in card and "@inproceedings" in card
    assert "- 14 linear layers merged by RegMean; 0 needed a ridge" in card
    ties = write_config(tmp_path, method="ties", base_model=models[0]["path"], models=models[1:])
    assert run("merge", ties, tmp_path / "ties").exit_code == 0
    card = (tmp_path / "ties" / "README.md").read_text()
    assert "## Citation\n\nYadav et al., TIES-Merging" in card and "RegMean" not in card.split("## Citation")[1]


def test_a_model_listed_twice_is_refused(tmp_path):
    """Sweep 4 F10: the same model spelled two ways merged at double weight without a word."""
    from test_bad_input import cli_fails

    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", stats=False)
    twice = [*models, {"path": models[0]["path"] + "/./"}]
    recipe = write_config(tmp_path, method="average", models=twice)
    cli_fails(["merge", recipe, tmp_path / "out"], "listed twice in the recipe (models 0 and 3)")


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"options": {"alpha": False}}, "alpha"),  # `alpha: off`
        ({"weight": True}, "models.0.weight"),  # `weight: yes`
        ({"output": {"lora": {"rank": True}}}, "output.lora.rank"),
    ],
    ids=["alpha-off", "weight-yes", "rank-true"],
)
def test_a_yes_no_value_where_a_number_goes_is_refused(tmp_path, change, where):
    """Sweep 5 F02: YAML reads off/yes/true as booleans, which passed as 0 and 1 (`alpha: off` merged at alpha 0)."""
    from test_bad_input import merge_fails

    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification")
    if "weight" in change:
        models[0]["weight"] = change.pop("weight")
    merge_fails(tmp_path, {"method": "regmean", "models": models, **change}, where, "expected a number, not")
