"""LoRA adapters as inputs: measuring and merging adapters over their base equals doing so on the same adapters merged
into full models by peft (merge_and_unload), for every layout peft saves (Linear, GPT-2's Conv1D, embeddings,
modules_to_save, trained biases, rsLoRA with per-module alpha); other adapter kinds are refused."""

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import TEXTS, build_model, save_model, write_jsonl
from safetensors.torch import load_file
from test_bad_input import cli_fails, merge_fails
from test_merge import run, write_config

from regmean.errors import RegmeanError
from regmean.io.adapter import AdaptedCheckpoint
from regmean.io.data import Example
from regmean.measure import measure

CASES = {
    "bert": (
        "BertForSequenceClassification",
        {"target_modules": ["query", "value", "word_embeddings"], "modules_to_save": ["classifier"], "bias": "all"},
    ),
    "gpt2": ("GPT2LMHeadModel", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "lora_bias": True}),
    "llama": (
        "LlamaForCausalLM",
        {"target_modules": ["q_proj", "down_proj", "gate_proj"], "use_rslora": True, "alpha_pattern": {"down_proj": 3}},
    ),
}


def make_adapter(base, options: dict, seed: int) -> peft.PeftModel:
    """A LoRA adapter with random A and B (peft starts B at zero, which would make every adapter the base)."""
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            trained_bias = options.get("bias") == "all" and name.endswith(".bias")
            if "lora_" in name or "modules_to_save" in name or trained_bias:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(params=sorted(CASES))
def adapters(request, tmp_path) -> tuple[Path, Path, list[Path], list[Path]]:
    """(root, base folder, two adapter folders, the same two merged into full model folders by peft)."""
    family = request.param
    cls, options = CASES[family]
    base = save_model(build_model(family, cls), tmp_path / "base")
    folders, full = [], []
    for k in range(2):
        adapted = make_adapter(build_model(family, cls), options, seed=10 + k)
        adapted.save_pretrained(tmp_path / f"adapter{k}")
        folders.append(tmp_path / f"adapter{k}")
        full.append(save_model(adapted.merge_and_unload(), tmp_path / f"full{k}"))
    return tmp_path, base, folders, full


def test_materialised_weights_equal_peft_merge(adapters):
    _, base, folders, full = adapters
    for adapter, merged in zip(folders, full, strict=True):
        ckpt, want = AdaptedCheckpoint(adapter, base), load_file(merged / "model.safetensors")
        changed = 0
        for key in ckpt.keys():
            got = ckpt.get(key)
            torch.testing.assert_close(got, want[key], rtol=1e-6, atol=1e-6, msg=key)
            rows = (1, max(2, got.shape[0] // 2)) if got.dim() else None
            if rows and got.shape[0] > 2:  # a row block is the same rows of the whole
                torch.testing.assert_close(ckpt.get(key, rows), got[rows[0] : rows[1]], rtol=0, atol=0)
            changed += not torch.equal(got, load_file(base / "model.safetensors")[key])
        assert changed >= 4  # the adapter changed the weights it targets


def _statistics(root: Path, model: Path, name: str, base: Path | None) -> Path:
    data = write_jsonl(root / "data.jsonl", [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]], ["x"] * 40)
    args = ["measure", model, "--data", data, "--out", root / name, "--max-length", 32]
    result = run(*args, *(["--base", base] if base else []))
    assert result.exit_code == 0, result.output
    return root / name


def test_measure_and_merge_adapters_equal_full_models(adapters):
    root, base, folders, full = adapters
    stats_a = [_statistics(root, a, f"sa{k}", base) for k, a in enumerate(folders)]
    stats_f = [_statistics(root, f, f"sf{k}", None) for k, f in enumerate(full)]
    for a, f in zip(stats_a, stats_f, strict=True):
        got, want = load_file(a / "statistics.safetensors"), load_file(f / "statistics.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=key)
    data = {"file": str(root / "data.jsonl"), "max_length": 32}
    for method in ("regmean", "average", "regmean_plusplus"):
        given = (lambda s: {"data": data}) if method == "regmean_plusplus" else (lambda s: {"statistics": str(s)})
        adapted = [{"path": str(a), **given(s)} for a, s in zip(folders, stats_a, strict=True)]
        plain = [{"path": str(f), **given(s)} for f, s in zip(full, stats_f, strict=True)]
        outs = []
        for name, models in (("adapters", adapted), ("full", plain)):
            recipe = {"method": method, "models": models, "base_model": str(base)}
            config = write_config(root, **recipe)
            result = run("merge", config, root / f"{method}-{name}")
            assert result.exit_code == 0, result.output
            outs.append(load_file(root / f"{method}-{name}" / "model.safetensors"))
        assert outs[0].keys() == outs[1].keys()
        for key in outs[1]:
            torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-4, atol=1e-5, msg=f"{method} {key}")
    assert (root / "regmean-adapters" / "tokenizer.json").is_file()
    assert f"(LoRA adapter over `{base}`)" in (root / "regmean-adapters" / "README.md").read_text()
    assert json.loads((root / "regmean-adapters" / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )


def _adapter_with(tmp_path: Path, **config_changes) -> tuple[Path, Path]:
    base = save_model(build_model("bert", "BertForSequenceClassification"), tmp_path / "in" / "base")
    adapter = make_adapter(build_model("bert", "BertForSequenceClassification"), {"target_modules": ["query"]}, 1)
    adapter.save_pretrained(tmp_path / "in" / "adapter")
    config_file = tmp_path / "in" / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_changes}))
    return base, tmp_path / "in" / "adapter"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"use_dora": True}, "DoRA adapters are not supported"),
        ({"peft_type": "IA3"}, "adapter type 'IA3' is not supported"),
        ({"base_model_name_or_path": "org/remote-model"}, "without its base model ('org/remote-model'"),
    ],
)
def test_unsupported_adapters_are_refused(tmp_path, changes, expected):
    base, adapter = _adapter_with(tmp_path, **changes)
    given = {} if "base_model_name_or_path" in changes else {"base_model": str(base)}
    full = save_model(build_model("bert", "BertForSequenceClassification", seed=1), tmp_path / "in" / "full")
    recipe = {"method": "average", "models": [{"path": str(adapter)}, {"path": str(full)}], **given}
    merge_fails(tmp_path, recipe, expected)


def test_adapter_over_the_wrong_base_is_refused(tmp_path):
    _, adapter = _adapter_with(tmp_path)
    other = save_model(build_model("gpt2", "GPT2LMHeadModel"), tmp_path / "in" / "gpt2")
    data = write_jsonl(tmp_path / "in" / "data.jsonl")
    cli_fails(["measure", adapter, "--data", data, "--out", tmp_path / "s", "--base", other], "lacks")
    assert not (tmp_path / "s").exists()


def test_an_adapter_used_over_another_local_base_than_its_own_is_said(tmp_path):
    """Sweep 5 F08: an adapter whose config names an existing local base, measured over another same-shaped model,
    gave statistics of a model nobody has without a word: now a warning names both (the same base: none)."""
    import warnings

    from regmean.errors import RegmeanWarning

    base, adapter = _adapter_with(tmp_path, base_model_name_or_path=None)
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(base)}))
    other = save_model(build_model("bert", "BertForSequenceClassification", seed=7), tmp_path / "in" / "other")
    ex = [Example(t, None, None) for t in TEXTS[:3]]
    with pytest.warns(RegmeanWarning, match=f"trained over {base} .* used over {other}"):
        measure(adapter, ex, base=other, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegmeanWarning)
        measure(adapter, ex, base=base, progress=False)


def test_the_base_an_adapter_names_is_an_input_no_output_lies_in(tmp_path):
    """Sweep 7 R10: with no base given, the base named by the adapters' configs was read but not an input: merge,
    measure and evaluate --json wrote inside it, and a resumed merge did not notice it had changed."""
    base, adapter = _adapter_with(tmp_path, base_model_name_or_path=None)
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(base)}))
    before = sorted(p.name for p in base.iterdir())
    inside = "the output lies inside the base model"
    twin = shutil.copytree(adapter, tmp_path / "in" / "twin")
    models = [{"path": str(adapter)}, {"path": str(twin)}]
    merge_fails(tmp_path, {"method": "average", "models": models}, inside, out_name="in/base/m")
    data = write_jsonl(tmp_path / "in" / "data.jsonl", TEXTS, [f"LABEL_{k % 3}" for k in range(len(TEXTS))])
    cli_fails(["measure", adapter, "--data", data, "--out", base / "stats"], inside)
    for given in ([], ["--base", base]):
        cli_fails(["evaluate", adapter, "--data", data, *given, "--json", base / "scores.json"], inside)
    assert sorted(p.name for p in base.iterdir()) == before


def test_measure_needs_the_base(tmp_path):
    _, adapter = _adapter_with(tmp_path)
    ex = [Example(t, None, None) for t in TEXTS]
    with pytest.raises(RegmeanError, match="a LoRA adapter without its base model"):
        measure(adapter, ex, progress=False)


def test_evaluate_scores_an_adapter_as_its_folded_model(adapters):
    """An adapter over its base (--base) scores exactly as the full model peft folds it into, beside it."""
    root, base, folders, full = adapters
    config = json.loads((base / "config.json").read_text())
    names = list(config.get("id2label", {}).values())
    labels = (
        [names[k % len(names)] for k in range(len(TEXTS))] if "Classification" in config["architectures"][0] else None
    )
    data = write_jsonl(root / "scored.jsonl", TEXTS, labels or ["x"] * len(TEXTS))
    out = root / "scores.json"
    result = run("evaluate", folders[0], full[0], "--data", data, "--base", base, "--json", out, "--max-length", 32)
    assert result.exit_code == 0, result.output
    adapter, folded = json.loads(out.read_text())
    metric = next(k for k in folded if k in ("perplexity", "accuracy"))
    assert adapter[metric] == pytest.approx(folded[metric], rel=1e-5) and adapter.get("tokens") == folded.get("tokens")
