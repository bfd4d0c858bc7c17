"""mergekit recipes are read as the same merge in ours (methods both tools have, mergekit's defaults); what has no
equivalent is refused in one line naming the recipe."""

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_bad_input import cli_fails
from test_merge import run
from test_ties_dare import llamas  # noqa: F401 (the fixture)


def merged(tmp_path: Path, name: str, recipe: dict) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run("merge", path, tmp_path / name)
    assert result.exit_code == 0, result.output
    return load_file(tmp_path / name / "model.safetensors")


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_mergekit_ties_and_linear_are_our_merges(llamas, tmp_path):  # noqa: F811
    models, base = llamas
    paths = [m["path"] for m in models]
    settings = list(zip(paths, [1, 2, 1], [0.3, 0.6, 1], strict=True))  # (model, weight, density)
    mergekit = {
        "merge_method": "TIES",
        "base_model": str(base),
        "models": [{"model": str(base)}]  # the base listed too, as mergekit recipes often do
        + [{"model": p, "parameters": {"weight": w, "density": d}} for p, w, d in settings],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    ours = {
        "method": "ties",
        "base_model": str(base),
        "models": [{"path": p, "weight": w, "options": {"density": d}} for p, w, d in settings],
        "options": {"scaling": 1.0},
        "dtype": "float32",
    }
    same(merged(tmp_path, "mk-ties", mergekit), merged(tmp_path, "ties", ours))
    linear = {
        "merge_method": "linear",
        "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, [1, 3, 1], strict=True)],
    }
    average = {"method": "average", "models": [{"path": p, "weight": w} for p, w in zip(paths, [1, 3, 1], strict=True)]}
    same(merged(tmp_path, "mk-linear", linear), merged(tmp_path, "average", average))
    arithmetic = {  # normalize: the task vectors' weights divided by their sum
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": p, "parameters": {"weight": 2.0}} for p in paths],
        "parameters": {"normalize": True, "lambda": 0.5},
    }
    ours = {"method": "task_arithmetic", "base_model": str(base), "options": {"scaling": 0.5}}
    ours["models"] = [{"path": p, "weight": 1 / 3} for p in paths]
    same(merged(tmp_path, "mk-ta", arithmetic), merged(tmp_path, "ta", ours))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"merge_method": "slerp"}, "mergekit method 'slerp' has no equivalent"),
        ({"merge_method": "dare_ties"}, "dare_ties with normalize: False has no equivalent"),
        ({"slices": []}, "mergekit's 'slices' has no equivalent"),
        ({"parameters": {"density": [0.1, 0.9]}}, "gradients and per-tensor values"),
        ({"parameters": {"epsilon": 0.1}}, "parameter 'epsilon' has no equivalent"),
        ({"tokenizer_source": "union"}, "tokenizer_source 'union'"),
        ({"models": [{"model": "a", "parameters": {"normalize": False}}]}, "applies to the whole merge"),
        # the first model is models.0, as our own recipes' messages number it (it said models[1]: sweep 5 F12)
        ({"models": [{"model": "a", "parameters": {"weight": [0.1, 0.9]}}]}, "models.0.parameters.weight: gradients"),
        # sweep 7 R14: adapters over another folder than base_model were applied over base_model, silently
        ({"models": [{"model": "other+lora_a"}, {"model": "other+lora_b"}]}, "apply LoRA adapters over other, and"),
        ({"models": [{"model": "+lora_a"}]}, "models.0: '+lora_a': give `<folder>+<lora folder>`"),  # sweep 8 F06
    ],
)
def test_what_mergekit_has_and_we_do_not_is_one_line(llamas, tmp_path, change, says):  # noqa: F811
    models, base = llamas
    recipe = {"merge_method": "ties", "base_model": str(base), "models": [{"model": m["path"]} for m in models]}
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({**recipe, **change}))
    cli_fails(["merge", path, tmp_path / "out"], str(path), says)
    assert not (tmp_path / "out").exists()


def test_one_base_folder_however_spelled_is_one_base(tmp_path):
    """Sweep 8 F05: `./base+a`, `base/+b` and an absolute path to the same folder were refused as different bases."""
    from regmean.merge.mergekit import from_mergekit

    (tmp_path / "base").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "base")
    raw = {
        "merge_method": "linear",
        "base_model": "base/",
        "models": [{"model": "./base+a"}, {"model": f"{tmp_path / 'base'}+b"}, {"model": "link+c"}],
    }
    recipe = from_mergekit(raw, str(tmp_path / "mk.yaml"))
    assert [m["path"] for m in recipe["models"]] == ["a", "b", "c"] and recipe["base_model"] == "base/"
