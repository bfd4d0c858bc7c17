"""Every class of the architecture matrix (tests/architectures.py) built tiny, measured and merged by RegMean: every
solved tensor satisfies the normal equations built from the statistics files, every other matrix is listed as
averaged with its reason, and the output loads with no missing or unexpected keys. The README's table is the
matrix's."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from architectures import ARCHITECTURES, table
from conftest import ALL_SITES, TARGETS, TEXTS
from safetensors.torch import load_file
from test_coverage import fine_tuned
from test_merge import normal_equation_residual, run, shrink

from regmean.io.data import Example
from regmean.measure import measure
from regmean.stats import StatisticsFile, save

ALPHA = 0.9


def test_the_readme_table_is_the_matrix():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table() in readme, "regenerate it: python tests/architectures.py"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a.cls for a in ARCHITECTURES])
def test_every_architecture_merges_with_every_matrix_solved_or_listed(tmp_path, arch):
    config = getattr(tf, arch.config)(**arch.options)
    cls = getattr(tf, arch.cls)
    examples = [Example(t, None, y if arch.targets else None) for t, y in zip(TEXTS, TARGETS, strict=True)]
    models = []
    for k in range(2):
        path = fine_tuned(cls, config, k + 1, tmp_path / f"m{k}")
        save(
            measure(path, examples[k * 3 : k * 3 + 5], batch_size=2, progress=False, protection=ALL_SITES),
            tmp_path / f"s{k}",
        )
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models, "options": {"alpha": ALPHA}}))
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    _, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    stats = [StatisticsFile(m["statistics"]) for m in models]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    solved = {row["tensor"]: row for row in report["layers"]}
    averaged = {entry.split("[")[0] for entry in report["averaged"]}  # key[e]: one expert of a 3-D tensor
    assert solved
    assert set(solved) | averaged == {key for key, t in merged.items() if t.dim() >= 2}
    assert not set(solved) & {entry for entry in report["averaged"] if "[" not in entry}
    never = [key for key, why in report["averaged"].items() if "never called in a forward pass" in why]
    assert len(never) == arch.never_run, never  # a vision tower measured on text: averaged, and said why
    unsaid = [why for key, why in report["averaged"].items() if why.startswith("linear layer") and key not in never]
    assert not unsaid, report["averaged"]
    for row in report["layers"]:
        key, sites = row["tensor"], [st.site(row["site"]) for st in stats]
        grams, scale = [shrink(s.gram.double(), ALPHA) for s in sites], [1.0 / s.count for s in sites]
        pick = expert_row(row["module"]) if merged[key].dim() == 3 else (lambda t: t)
        transposed = pick(merged[key]).shape[-1] != sites[0].gram.shape[0]
        weights = [(pick(sd[key]).T if transposed else pick(sd[key])).double() for sd in inputs]
        ours = (pick(merged[key]).T if transposed else pick(merged[key])).double()
        assert normal_equation_residual(ours, weights, grams, scale) < 1e-4, row["module"]
    for entry in report["averaged"]:  # what the report says is what was done
        key, _, e = entry.partition("[")
        pick = (lambda t, e=int(e[:-1]): t[e]) if e else (lambda t: t)
        torch.testing.assert_close(pick(merged[key]), (pick(inputs[0][key]) + pick(inputs[1][key])) / 2, msg=entry)


def expert_row(module: str):
    """The row of a 3-D experts tensor that expert projection `module` (`<experts>.<e>.<part>`) is."""
    e = int(module.split(".")[-2])
    return lambda t: t[e]
