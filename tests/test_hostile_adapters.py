"""Hostile LoRA adapters and regular expressions: an adapter is checked as peft would load it (r, rank_pattern,
float tensors, a scale that cannot overflow) before any work, and every user pattern (--include/--exclude,
head_modules, alpha_pattern/rank_pattern) is bounded in time and size: one line naming the file, exit 2."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import build_model, save_model, write_jsonl
from safetensors.torch import load_file, save_file
from test_bad_input import cli_fails, merge_fails
from test_merge import run, write_config

from regmean.errors import RegmeanError
from regmean.io.adapter import AdaptedCheckpoint
from regmean.io.untrusted import PATTERN_BUDGET, PATTERN_SECONDS, compile_pattern
from regmean.stats import StatisticsFile

CLS = "BertForSequenceClassification"
BACKTRACKS = r"(\w|[a-z]|\.)*\d\D\d"
"""Catastrophic backtracking on module names such as bert.encoder.layer.0.attention.self.query (in `regex` too)."""
ISSUE_PATTERN = r"(\w+\.?)+x"
"""The issue's pattern: hangs Python's `re` on module names."""
OPTIONS = {
    "target_modules": ["query", "key", "value"],
    "modules_to_save": ["classifier"],
    "rank_pattern": {"query": 2},
    "alpha_pattern": {"value": 3, r"layer\.1\..*key": 5},
}


def make_adapter(options: dict, seed: int, folder: Path) -> Path:
    """A peft LoRA adapter (r 4, alpha 8 unless patterned) with random A and B, saved by peft."""
    model = peft.get_peft_model(build_model("bert", CLS), peft.LoraConfig(r=4, lora_alpha=8, **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    save_model(build_model("bert", CLS), root / "base")
    save_model(build_model("bert", CLS, seed=1), root / "full")
    for k in range(2):
        make_adapter(OPTIONS, 10 + k, root / f"adapter{k}")
    return root


@pytest.fixture
def inputs(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "in")
    return tmp_path / "in"


def edit(adapter: Path, config=None, tensors=None) -> Path:
    """Change an adapter's config keys and/or its tensors (a function of the tensor dict), in place."""
    if config:
        file = adapter / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    if tensors:
        weights = load_file(adapter / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, adapter / "adapter_model.safetensors")
    return adapter


def recipe(inputs: Path, **extra) -> dict:
    models = [{"path": str(inputs / "adapter0")}, {"path": str(inputs / "full")}]
    return {"method": "average", "models": models, "base_model": str(inputs / "base"), **extra}


def first(weights: dict, part: str) -> str:
    return next(k for k in sorted(weights) if part in k)


def cast(part: str, dtype: torch.dtype):
    def change(weights: dict) -> None:
        key = first(weights, part)
        weights[key] = weights[key].to(dtype) if dtype != torch.bool else weights[key] > 0

    return change


@pytest.mark.parametrize(
    ("config", "tensors", "says"),
    [
        ({"r": 0}, None, "adapter_config.json: r is 0; it must be a whole number of at least 1"),
        ({"r": 2.5}, None, "r is 2.5"),
        ({"r": 2, "rank_pattern": {}}, None, "adapter_config.json: r gives"),
        ({"rank_pattern": {"query": 4}}, None, "rank_pattern 'query' gives"),
        ({"rank_pattern": {"query": 0}}, None, "rank_pattern 'query' is 0"),
        (None, cast("lora_A", torch.int32), "is I32; LoRA tensors must be floating point"),
        (None, cast("lora_B", torch.bool), "is BOOL; LoRA tensors must be floating point"),
        (None, cast("classifier.weight", torch.int32), "is I32, but the base's classifier"),
        ({"lora_alpha": 1e30}, None, "above 10000: far beyond any trained weight"),
        ({"lora_alpha": 1e300}, None, "(activations through it would overflow); fix lora_alpha"),
        ({"alpha_pattern": {"value": -1e300}}, None, "far beyond any trained weight"),
        ({"lora_alpha": "8"}, None, "lora_alpha is '8'; it must be a finite number"),
        ({"alpha_pattern": {"value": None}}, None, "alpha_pattern 'value' is None"),
        ({"rank_pattern": {"(unclosed": 2}}, None, "rank_pattern: invalid regular expression '(unclosed'"),
        ({"alpha_pattern": {"a{99999}": 2}}, None, "alpha_pattern: pattern 'a{99999}' is too large"),
        (None, lambda w: w[first(w, "lora_B")].fill_(3e38), "far beyond any trained weight"),
        (None, lambda w: w[first(w, "lora_A")].fill_(float("nan")), "has NaN or Inf values"),
        ({"target_modules": ["query", "value"]}, None, "key, which target_modules leaves out"),
        ({"target_modules": r".*\.(query|value)"}, None, "key, which target_modules leaves out"),
        ({"exclude_modules": ["key"]}, None, "key, which exclude_modules excludes"),
        ({"layers_to_transform": [0]}, None, "layers_to_transform is not supported"),
        (None, lambda w: [w.pop(k) for k in list(w) if "classifier" in k], "modules_to_save names classifier"),
    ],
)
def test_adapters_peft_could_not_load_are_refused_before_any_work(inputs, config, tensors, says):
    edit(inputs / "adapter0", config, tensors)
    errors = merge_fails(inputs.parent, recipe(inputs), says)
    assert str(inputs / "adapter0") in errors[0]


def test_fan_in_fan_out_follows_the_module_type_as_peft_does(inputs):
    """peft ignores fan_in_fan_out on nn.Linear (and forces it on Conv1D): so does the merge, equal to peft."""
    edit(inputs / "adapter0", {"fan_in_fan_out": True})
    ckpt = AdaptedCheckpoint(inputs / "adapter0", inputs / "base")
    assert not any(pair.transposed for pair in ckpt.pairs.values())
    module = "bert.encoder.layer.0.attention.self.query"
    base = load_file(inputs / "base" / "model.safetensors")[f"{module}.weight"]
    expected = base.double() + naive_delta(inputs / "adapter0", module)
    torch.testing.assert_close(ckpt.get(f"{module}.weight").double(), expected, rtol=1e-5, atol=1e-6)


def test_non_finite_alpha_in_the_json_is_refused(inputs):
    file = inputs / "adapter0" / "adapter_config.json"
    config = json.dumps({**json.loads(file.read_text()), "lora_alpha": 8})
    for text, says in (("NaN", "NaN is not valid JSON"), ("1e400", "lora_alpha is inf")):
        file.write_text(config.replace('"lora_alpha": 8', f'"lora_alpha": {text}'))
        merge_fails(inputs.parent, recipe(inputs), str(file), says)


def test_measure_refuses_a_bad_adapter_before_peft_loads_it(inputs):
    edit(inputs / "adapter0", {"r": 2, "rank_pattern": {}})
    data = write_jsonl(inputs.parent / "d.jsonl")
    out = inputs.parent / "s"
    cli_fails(["measure", inputs / "adapter0", "--data", data, "--out", out, "--base", inputs / "base"], "r gives")
    assert not out.exists()


def test_a_folder_with_an_adapter_and_a_full_model_is_refused(inputs):
    """Sweep finding L14: such a folder was merged as base + adapter, the full model's weights silently ignored
    (transformers would load the full model and apply the adapter)."""
    shutil.copy(inputs / "full" / "model.safetensors", inputs / "adapter0" / "model.safetensors")
    says = ("holds both a LoRA adapter", "model.safetensors", "a folder of its own")
    merge_fails(inputs.parent, recipe(inputs), str(inputs / "adapter0"), *says)
    data = write_jsonl(inputs.parent / "d.jsonl")
    out = inputs.parent / "s"
    cli_fails(["measure", inputs / "adapter0", "--data", data, "--out", out, "--base", inputs / "base"], *says)
    assert not out.exists()


def test_evaluate_of_an_adapter_without_its_base_names_the_fix(inputs):
    """Sweep finding E06 (was "config.json: missing (save_pretrained writes it)"); adapters are scored since."""
    data = write_jsonl(inputs.parent / "d.jsonl")
    cli_fails(["evaluate", inputs / "adapter0", "--data", data], "a LoRA adapter without its base model", "--base")


def cli_within(args: list, seconds: float) -> subprocess.CompletedProcess:
    """The CLI in a child process that must end within `seconds` (a hang fails the test instead of stalling it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "regmean", *map(str, args)], capture_output=True, text=True, env=env, timeout=seconds
    )
    assert "Traceback" not in result.stderr, result.stderr
    print(f"{args[0]} took {time.monotonic() - start:.1f} s")
    return result


@pytest.mark.slow  # a child process with a time limit each
@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
def test_a_backtracking_adapter_pattern_is_refused_in_seconds(inputs, field):
    edit(inputs / "adapter0", {field: {BACKTRACKS: 4}})
    config = write_config(inputs.parent, **recipe(inputs))
    result = cli_within(["merge", config, inputs.parent / "out"], 120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {inputs / 'adapter0' / 'adapter_config.json'}: {field}: pattern {BACKTRACKS!r} takes too long to "
        f"match names (over {PATTERN_SECONDS} s for one name or {PATTERN_BUDGET} s in all: it backtracks); simplify it"
    ]
    assert not (inputs.parent / "out").exists()


@pytest.mark.slow  # a child process with a time limit each
@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_a_backtracking_measure_pattern_is_refused_in_seconds(inputs, flag):
    data = write_jsonl(inputs.parent / "d.jsonl")
    out = inputs.parent / "s"
    result = cli_within(["measure", inputs / "full", "--data", data, "--out", out, flag, BACKTRACKS], 120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {flag}: pattern {BACKTRACKS!r} takes too long to match names"), line
    assert not out.exists()


def test_a_backtracking_head_modules_pattern_is_refused(inputs):
    given = recipe(inputs, heads="keep", head_modules=[BACKTRACKS])
    merge_fails(inputs.parent, given, f"head_modules: pattern {BACKTRACKS!r} takes too long")


@pytest.mark.slow  # a child process with a time limit each
def test_the_issue_pattern_no_longer_hangs(inputs):
    """`(\\w+\\.?)+x` matches no module name: measure finds nothing to measure, the merge applies no alpha_pattern."""
    data = write_jsonl(inputs.parent / "d.jsonl")
    args = ["measure", inputs / "full", "--data", data, "--out", inputs.parent / "s", "--include", ISSUE_PATTERN]
    result = cli_within(args, 120)
    assert result.returncode == 2 and "no linear module left to measure" in result.stderr, result.stderr
    edit(inputs / "adapter0", {"alpha_pattern": {ISSUE_PATTERN: 1000}})
    ckpt = AdaptedCheckpoint(inputs / "adapter0", inputs / "base")
    assert {pair.scale for pair in ckpt.pairs.values()} == {8 / 2, 8 / 4}


@pytest.mark.slow  # a child process with a time limit each
def test_measure_of_an_adapter_with_the_issue_pattern_finishes(inputs):
    """measure builds the adapted model from the adapter's own (bounded) matching, never peft's `re`: the pattern
    that would hang peft applies to nothing, and the statistics equal those of the same adapter without it."""
    data = write_jsonl(inputs.parent / "d.jsonl")
    plain = inputs.parent / "plain"
    base = ["--data", data, "--base", inputs / "base", "--max-length", 16]
    assert cli_within(["measure", inputs / "adapter0", *base, "--out", plain], 120).returncode == 0
    edit(inputs / "adapter0", {"alpha_pattern": {ISSUE_PATTERN: 1000, **OPTIONS["alpha_pattern"]}})
    hostile = inputs.parent / "hostile"
    result = cli_within(["measure", inputs / "adapter0", *base, "--out", hostile], 120)
    assert result.returncode == 0, result.stderr
    a, b = StatisticsFile(plain), StatisticsFile(hostile)
    for name in a.site_names:
        assert torch.equal(a.site(name).gram, b.site(name).gram), name


def test_pattern_bounds_are_one_line():
    for pattern in ("((a{1000}){1000}){1000}", "a{" + "9" * 5000 + "}", "x" * 100_001):
        with pytest.raises(RegmeanError, match="is too large"):
            compile_pattern(pattern, "--include")
    slow = compile_pattern(BACKTRACKS, "--include")
    start = time.monotonic()
    with pytest.raises(RegmeanError, match="takes too long"):
        slow.search("bert.encoder.layer.0.attention.self.query")
    assert time.monotonic() - start < 2
    assert compile_pattern(r"layer\.\d{1,2}\.", "--include").search("bert.encoder.layer.11.output")


def naive_delta(adapter: Path, module: str) -> torch.Tensor:
    """s B A for one module, from the saved tensors, with the test's own reading of OPTIONS."""
    saved = load_file(adapter / "adapter_model.safetensors")
    a = saved[f"base_model.model.{module}.lora_A.weight"]
    b = saved[f"base_model.model.{module}.lora_B.weight"]
    rank = 2 if module.endswith("query") else 4
    alpha = 3 if module.endswith("value") else 5 if module.endswith("layer.1.attention.self.key") else 8
    assert a.shape[0] == rank == b.shape[1]  # peft applied the rank_pattern
    return alpha / rank * (b.double() @ a.double())


def test_a_valid_adapter_with_rank_and_alpha_patterns_merges_as_w_plus_s_b_a(inputs):
    base = load_file(inputs / "base" / "model.safetensors")
    models = [{"path": str(inputs / f"adapter{k}")} for k in range(2)]
    config = write_config(inputs.parent, method="average", models=models, base_model=str(inputs / "base"))
    result = run("merge", config, inputs.parent / "out")
    assert result.exit_code == 0, result.output
    merged = load_file(inputs.parent / "out" / "model.safetensors")
    modules = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")]
    for module in modules:
        key = module + ".weight"
        deltas = [naive_delta(inputs / f"adapter{k}", module) for k in range(2)]
        want = base[key].double() + (deltas[0] + deltas[1]) / 2
        torch.testing.assert_close(merged[key].double(), want, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.allclose(merged[key], base[key])
    saved = [load_file(inputs / f"adapter{k}" / "adapter_model.safetensors") for k in range(2)]
    head = "base_model.model.classifier.weight"
    torch.testing.assert_close(merged["classifier.weight"], (saved[0][head] + saved[1][head]) / 2)
