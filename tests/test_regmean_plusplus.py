"""RegMean++: against RegMean where they must agree, against a naive implementation written plainly here (a model
folder saved per stage and candidate, measured by `measure`, solved by the normal equations), and on bad input."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import ALL_SITES, TARGETS, TEXTS, build_model, save_model, write_jsonl
from safetensors.torch import load_file, save_file
from test_bad_input import merge_fails
from test_merge import run, write_config

from regmean.io.data import Example
from regmean.measure import measure
from regmean.merge import merge
from regmean.merge.config import MergeConfig
from regmean.merge.inputs import open_inputs
from regmean.methods.average import weighted_average
from regmean.methods.least_squares import regmean_solve
from regmean.methods.regmean_plusplus import RegMeanPlusPlus, StageStep
from regmean.stats import save

ALPHA = 0.9
# each model's own data: pairs of the test texts, more examples than the tiny models are wide (so that Grams of
# per-example inputs, a pooler's or a classifier's, have full rank), different for each model
PAIRS = [(f"{a} {b}", y) for a, y in zip(TEXTS, TARGETS, strict=True) for b in TEXTS if a != b]
DATA = [PAIRS[0:60:2], PAIRS[1:60:2]]


def data_file(root: Path, k: int) -> Path:
    return write_jsonl(root / f"data{k}.jsonl", [t for t, _ in DATA[k]], [y for _, y in DATA[k]])


def examples(k: int) -> list[Example]:
    return [Example(t, None, y) for t, y in DATA[k]]


def perturbed(family: str, cls: str, seed: int) -> torch.nn.Module:
    """A fine-tune whose every tensor differs from the others' (conftest's noise leaves constant tensors, norms'
    weights and zero biases, identical), so that a wrong norm or bias in a stage shows."""
    model = build_model(family, cls, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def entries(root: Path, family: str, cls: str, seeds=(1, 2), target=False, weights=(1.0, 1.0)) -> list[dict]:
    out = []
    for k, seed in enumerate(seeds):
        path = save_model(perturbed(family, cls, seed), root / f"ft{k}")
        data = {"file": str(data_file(root, k)), "batch_size": 8}
        if target:
            data["target_field"] = "label"
        out.append({"path": str(path), "data": data, "weight": weights[k]})
    return out


def merged_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def linear_layouts(path: Path) -> dict[str, bool]:
    """Module name -> whether it stores its weight transposed (GPT-2's Conv1D), for every linear module."""
    config = tf.AutoConfig.from_pretrained(path)
    model = getattr(tf, config.architectures[0])(config)
    kinds = (torch.nn.Linear, tf.pytorch_utils.Conv1D)
    return {n: isinstance(m, tf.pytorch_utils.Conv1D) for n, m in model.named_modules() if isinstance(m, kinds)}


def naive_regmean_plusplus(models: list[dict], stages: list[str], work: Path, through_merged=True) -> dict:
    """Average everything; then for each stage (a tensor-name prefix), for each candidate: save the merged model
    with the candidate's own tensors of the stage as a model folder, measure it on the candidate's data with
    `measure`, and solve the stage's linear layers one by one with RegMean's solve (tested against least squares
    in test_methods; shared here so that both sides round alike: the tiny models' per-example Grams, a pooler's
    or a classifier's, are ill-conditioned enough to turn rounding into visible differences).

    With through_merged=False every candidate is measured as it is: plain RegMean."""
    states = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    weights = torch.tensor([m["weight"] for m in models], dtype=torch.float64)
    merged = {
        key: weighted_average([s[key] for s in states], weights) if value.is_floating_point() else value
        for key, value in states[0].items()
    }
    transposed = linear_layouts(Path(models[0]["path"]))
    for s, prefix in enumerate(stages):
        measured = []
        for k, model in enumerate(models):
            own = {key: v for key, v in states[k].items() if key.startswith(prefix)}
            state = {**merged, **own} if through_merged else states[k]
            folder = work / f"stage{s}_model{k}"
            shutil.copytree(model["path"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            measured.append(measure(folder, examples(k), batch_size=8, progress=False, protection=ALL_SITES))
        for module in [m for m in measured[0].modules if (m + ".").startswith(prefix)]:
            sites = [st.sites[st.modules[module]] for st in measured]
            own = [states[k][module + ".weight"] for k in range(len(models))]
            own = [w.T if transposed[module] else w for w in own]  # as [d_out, d_in]
            scale = weights / weights.max() / torch.tensor([site.count for site in sites], dtype=torch.float64)
            solution = regmean_solve(own, [site.gram for site in sites], scale, weights, ALPHA).merged
            merged[module + ".weight"] = (solution.T if transposed[module] else solution).float().contiguous()
    return merged


NAIVE_CASES = [
    (
        "bert",
        "BertForSequenceClassification",
        ["bert.encoder.layer.0.", "bert.encoder.layer.1.", "bert.pooler.", "classifier."],
    ),
    (
        "distilbert",
        "DistilBertForSequenceClassification",
        ["distilbert.transformer.layer.0.", "distilbert.transformer.layer.1.", "pre_classifier.", "classifier."],
    ),
    (
        "t5",
        "T5ForConditionalGeneration",
        ["encoder.block.0.", "encoder.block.1.", "decoder.block.0.", "decoder.block.1."],
    ),
    ("gpt2", "GPT2LMHeadModel", ["transformer.h.0.", "transformer.h.1."]),
    ("llama", "LlamaForCausalLM", ["model.layers.0.", "model.layers.1."]),
]


@pytest.mark.parametrize(("family", "cls", "stages"), NAIVE_CASES, ids=[c[1] for c in NAIVE_CASES])
def test_equals_a_naive_implementation_on_every_family(tmp_path, family, cls, stages):
    models = entries(tmp_path, family, cls, target=family == "t5", weights=(1.0, 2.0))
    recipe = {"method": "regmean_plusplus", "models": models, "options": {"alpha": ALPHA}}
    report = merge(MergeConfig.parse(recipe), tmp_path / "out", progress=False)
    assert not [key for key, why in report.averaged.items() if why.startswith("linear layer")]
    ours = merged_state(tmp_path / "out")
    naive = naive_regmean_plusplus(models, stages, tmp_path)
    assert ours.keys() == naive.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], naive[key], rtol=1e-5, atol=1e-7, msg=key)
    # the test can tell: plain RegMean (every candidate measured on its own model) is far from both
    plain = naive_regmean_plusplus(models, stages, tmp_path / "plain", through_merged=False)
    last = [k for k in ours if k.startswith(stages[1]) and k.endswith("weight") and ours[k].dim() == 2]
    gap = max(float((plain[k] - ours[k]).abs().max()) for k in last)
    assert gap > 1e-4, gap


def test_one_block_with_identical_embeddings_equals_regmean(tmp_path):
    """The block's input is the embeddings' output, the same for the merged model and every candidate."""
    config = tf.BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
    )
    models = []
    for k in range(2):
        torch.manual_seed(0)
        model = tf.BertForTokenClassification(config).eval()
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("bert.embeddings."):
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        path = save_model(model, tmp_path / f"ft{k}")
        save(measure(path, examples(k), batch_size=8, progress=False, protection=ALL_SITES), tmp_path / f"stats{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"stats{k}")})
    keep = {"heads": "keep", "head_modules": ["classifier"]}
    merge(MergeConfig.parse({"method": "regmean", "models": models, **keep}), tmp_path / "rm", progress=False)
    plusplus = [
        {"path": m["path"], "data": {"file": str(data_file(tmp_path, k)), "batch_size": 8}}
        for k, m in enumerate(models)
    ]
    merge(
        MergeConfig.parse({"method": "regmean_plusplus", "models": plusplus, **keep}), tmp_path / "pp", progress=False
    )
    for folder in ("ft0", "ft1"):
        a, b = merged_state(tmp_path / "rm" / folder), merged_state(tmp_path / "pp" / folder)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


IDENTICAL_CASES = [
    ("llama", "LlamaForSequenceClassification", "average"),
    ("bert", "BertForSequenceClassification", "joint"),
]


@pytest.mark.parametrize(("family", "cls", "bias"), IDENTICAL_CASES, ids=[c[1] for c in IDENTICAL_CASES])
def test_identical_candidates_give_the_candidate(tmp_path, family, cls, bias):
    model = build_model(family, cls, seed=3)
    models = []
    for k in range(2):
        path = save_model(model, tmp_path / f"copy{k}")
        models.append({"path": str(path), "data": {"file": str(data_file(tmp_path, k))}})
    recipe = {"method": "regmean_plusplus", "models": models, "options": {"bias": bias}}
    report = merge(MergeConfig.parse(recipe), tmp_path / "out", progress=False)
    assert not [key for key, why in report.averaged.items() if why.startswith("linear layer")]
    assert bias in {layer.bias for layer in report.layers}
    ours, original = merged_state(tmp_path / "out"), load_file(tmp_path / "copy0" / "model.safetensors")
    for key in original:  # float32 Grams of per-example inputs (pooler, classifier) are poorly conditioned
        torch.testing.assert_close(ours[key], original[key], rtol=1e-5, atol=5e-6, msg=key)


def test_grams_through_the_merged_prefix_match_the_hidden_states(tmp_path, monkeypatch):
    """The Grams of block 1's input that the merge measured, for model k's data, are the sums of h h^T over model
    k's unpadded tokens of the hidden state after block 0 of the merged model as written."""
    measured = {}
    original = RegMeanPlusPlus.stage_grams

    def spy(self, stage, batches):
        grams = original(self, stage, batches)
        measured.setdefault(stage.name, []).append(grams)
        return grams

    monkeypatch.setattr(RegMeanPlusPlus, "stage_grams", spy)
    models = entries(tmp_path, "bert", "BertForSequenceClassification")
    merge(MergeConfig.parse({"method": "regmean_plusplus", "models": models}), tmp_path / "out", progress=False)
    merged = tf.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    for k in range(2):
        ours = measured["bert.encoder.layer.1"][k]["bert.encoder.layer.1.attention.self.query"]
        enc = tokenizer([text for text, _ in DATA[k]], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = merged(**enc, output_hidden_states=True).hidden_states[1]
        rows = hidden[enc["attention_mask"].bool()].double()
        assert ours.count == rows.shape[0]
        torch.testing.assert_close(ours.gram.double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.sum.double(), rows.sum(0), rtol=1e-5, atol=1e-5)


def test_plan_card_and_memory(tmp_path, monkeypatch):
    models = entries(tmp_path, "gpt2", "GPT2ForSequenceClassification")
    config = MergeConfig.parse({"method": "regmean_plusplus", "models": models})
    method = RegMeanPlusPlus(open_inputs(config))
    steps = [s for s in method.plan() if isinstance(s, StageStep)]
    assert [s.stage.name for s in steps] == ["transformer.h.0", "transformer.h.1", "score"]
    block = {k: v for k, v in load_file(Path(models[0]["path"]) / "model.safetensors").items() if ".h.0." in k}
    assert set(steps[0].swap) == set(block)
    assert steps[0].cost.read_bytes == 2 * sum(v.numel() * v.element_size() for v in block.values())
    assert steps[0].cost.working_bytes > steps[0].cost.read_bytes + 2 * 3 * 17 * 17 * 4  # + K Grams of 3 sites
    path = write_config(tmp_path, method="regmean_plusplus", models=models)
    result = run("merge", path, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "RegMean++" in result.output and "3 stages" in result.output and "6 forward passes" in result.output
    result = run("merge", path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "regmean_plusplus" in card and "## Data provenance" in card
    assert "data=data0.jsonl" in card and "examples=30" in card
    assert not any(text in card for text, _ in DATA[0] + DATA[1])  # never the texts
    # a working model over --max-memory is refused before it is loaded
    monkeypatch.setattr(RegMeanPlusPlus, "resident_bytes", lambda self: 10**13)
    monkeypatch.setattr("regmean.methods.regmean_plusplus.load_adapted", lambda *a, **k: pytest.fail("loaded"))
    result = run("merge", path, tmp_path / "out2", "--max-memory", "100GB")
    assert result.exit_code == 2 and "holds 10.0 TB through the merge" in result.output, result.output
    assert not (tmp_path / "out2").exists()


def test_legacy_key_names_merge_as_the_current_ones(tmp_path):
    """A checkpoint with LayerNorm.gamma/beta (renamed by transformers on loading) gives the same merge."""
    models = entries(tmp_path, "bert", "BertForSequenceClassification")
    legacy = []
    for k, m in enumerate(models):
        state = load_file(Path(m["path"]) / "model.safetensors")
        renamed = {
            key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for key, v in state.items()
        }
        folder = tmp_path / f"legacy{k}"
        shutil.copytree(m["path"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
        legacy.append({**m, "path": str(folder)})
    merge(MergeConfig.parse({"method": "regmean_plusplus", "models": models}), tmp_path / "now", progress=False)
    merge(MergeConfig.parse({"method": "regmean_plusplus", "models": legacy}), tmp_path / "old", progress=False)
    now, old = merged_state(tmp_path / "now"), merged_state(tmp_path / "old")
    for key, value in now.items():
        name = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        torch.testing.assert_close(old[name], value, rtol=0, atol=0, msg=key)


def test_bad_input_is_one_line_before_any_work(tmp_path):
    models = entries(tmp_path / "in", "bert", "BertForSequenceClassification")
    recipe = {"method": "regmean_plusplus", "models": models}
    without = [{**models[0], "data": None}, models[1]]
    without[0].pop("data")
    merge_fails(tmp_path, {**recipe, "models": without}, "give every model `data: {file: ...}`", "use regmean")
    field = [{**models[0], "data": {**models[0]["data"], "text_field": "sentence"}}, models[1]]
    merge_fails(tmp_path, {**recipe, "models": field}, "no column 'sentence'")
    empty = tmp_path / "in" / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    blank = [models[0], {**models[1], "data": {"file": str(empty)}}]
    merge_fails(tmp_path, {**recipe, "models": blank}, "no non-empty 'text' values")
    merge_fails(tmp_path, {"method": "average", "models": models}, "reads no data")
    numbers = tmp_path / "in" / "numbers.jsonl"
    numbers.write_text('{"text": "fine"}\n{"text": 7}\n')
    bad = [models[0], {**models[1], "data": {"file": str(numbers)}}]
    merge_fails(tmp_path, {**recipe, "models": bad}, "row 2: 'text' is a int")
    long = tmp_path / "in" / "long.jsonl"
    long.write_text('{"text": "%s"}\n' % ("word " * 100))
    bad = [models[0], {**models[1], "data": {"file": str(long), "max_length": 512}}]
    errors = merge_fails(
        tmp_path,
        {**recipe, "models": bad},
        f"{long}: {models[1]['path']}/config.json: declares 64 positions",
        "data: max_length",
    )
    assert len(errors) == 1


def test_encoder_decoder_lm_needs_targets(tmp_path):
    models = entries(tmp_path / "in", "t5", "T5ForConditionalGeneration")
    errors = merge_fails(tmp_path, {"method": "regmean_plusplus", "models": models}, "data: target_field")
    assert len(errors) == 2  # one per model, both reported
    partial = tmp_path / "in" / "partial.jsonl"
    partial.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    models = [{**m, "data": {"file": str(partial), "target_field": "label"}} for m in models]
    merge_fails(tmp_path, {"method": "regmean_plusplus", "models": models}, "every example needs a decoder target")
