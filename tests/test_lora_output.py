"""A merge written as one LoRA adapter (`output: {lora: {rank: r}}`, `merge --lora-rank`): at the sum of the input
adapters' ranks (or full rank) the adapter folded by peft is the full-model merge (but for embeddings, left at the
base's and said so); at a lower rank each update is the best rank-r one, checked against a second computation
(symmetric square root of the RegMean system, dense solves) and against its optimality (the error is the tail of
the singular values)."""

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import build_model, save_model
from safetensors.torch import load_file
from test_lora import CASES, _statistics, make_adapter
from test_merge import run, write_config

from regmean.merge.lora_writer import low_rank_update


@pytest.fixture(params=sorted(CASES))
def lora_inputs(request, tmp_path):
    return adapters_with_statistics(request.param, tmp_path)


def adapters_with_statistics(family: str, tmp_path: Path):
    """(family, root, base, two adapters, their statistics)."""
    cls, options = CASES[family]
    base = save_model(build_model(family, cls), tmp_path / "base")
    folders = []
    for k in range(2):
        make_adapter(build_model(family, cls), options, seed=20 + k).save_pretrained(tmp_path / f"adapter{k}")
        folders.append(tmp_path / f"adapter{k}")
    stats = [_statistics(tmp_path, a, f"s{k}", base) for k, a in enumerate(folders)]
    return family, tmp_path, base, folders, stats


def _merge(root: Path, method: str, folders, stats, base: Path, out: str, *extra) -> Path:
    models = [{"path": str(a), "statistics": str(s)} for a, s in zip(folders, stats, strict=True)]
    recipe = {"method": method, "models": models, "base_model": str(base)}
    result = run("merge", write_config(root, **recipe), root / out, *extra)
    assert result.exit_code == 0, result.output
    return root / out


def _folded(family: str, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter folded into its base by peft itself, as a state dict."""
    cls = getattr(transformers, CASES[family][0])
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("method", ["regmean", "average"])
def test_full_rank_adapter_is_the_full_merge(lora_inputs, method):
    family, root, base, folders, stats = lora_inputs
    full = load_file(_merge(root, method, folders, stats, base, f"{method}-full") / "model.safetensors")
    _merge(root, method, folders, stats, base, f"{method}-lora", "--lora-rank", 2)
    # rank 8, the sum of the inputs' ranks (2 x 4): exact for RegMean too (its update is S^-1 sum_i c_i G~_i D_i^T)
    out = _merge(root, method, folders, stats, base, f"{method}-lora", "--lora-rank", 8, "--force")  # replaced
    assert not (out / "config.json").exists() and (out / "adapter_model.safetensors").is_file()
    folded, base_weights = _folded(family, base, out), load_file(base / "model.safetensors")
    report = json.loads((out / "merge_report.json").read_text())
    kept = {n["tensor"] for n in report["output_notes"] if n["kind"] == "kept base"}
    compared = 0
    for key, want in full.items():
        if key not in folded:
            continue
        expected = base_weights[key] if key in kept else want
        torch.testing.assert_close(folded[key], expected.to(folded[key].dtype), rtol=1e-5, atol=1e-5, msg=key)
        compared += not torch.equal(want, base_weights.get(key, want))
    assert compared >= 4  # the merge changed what the adapter holds
    assert kept == ({"bert.embeddings.word_embeddings.weight"} if family == "bert" else set())
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card and "## Adapter" in card
    if kept:
        assert "left at the base's in the adapter: bert.embeddings.word_embeddings.weight" in card


def _system_oracle(stats: list[Path], site: str, alpha: float = 0.9) -> torch.Tensor:
    """sum_i G~_i / n_i (RegMean's system with mean weighting, equal model weights), read plainly from the files."""
    from regmean.stats import StatisticsFile

    system = 0
    for path in stats:
        st = StatisticsFile(path).site(site)
        g = st.gram.double()
        system = system + (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))) / st.count
    return system


def _best_rank_r(delta: torch.Tensor, system: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """argmin over rank-r X of tr((delta - X) S (delta - X)^T), by the symmetric square root of S (eigh) and dense
    solves: a second way to the adapter's Cholesky-and-triangular-solve; and the least error."""
    values, vectors = torch.linalg.eigh(system)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(delta @ root, full_matrices=False)
    best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    return torch.linalg.solve(root, best.T).T, float(s[r:].square().sum())


def test_low_rank_regmean_update_is_the_best_in_the_system_metric(tmp_path):
    _, root, base, folders, stats = adapters_with_statistics("llama", tmp_path)
    full = load_file(_merge(root, "regmean", folders, stats, base, "full") / "model.safetensors")
    out = _merge(root, "regmean", folders, stats, base, "lora", "--lora-rank", 2)
    adapter, base_weights = load_file(out / "adapter_model.safetensors"), load_file(base / "model.safetensors")
    module = "model.layers.1.self_attn.q_proj"  # (layer 0's site is withheld: measure's default)
    from regmean.stats import StatisticsFile

    site = StatisticsFile(stats[0]).modules[module]
    system = _system_oracle(stats, site)
    delta = full[f"{module}.weight"].double() - base_weights[f"{module}.weight"].double()
    want, least = _best_rank_r(delta, system, 2)
    b, a = (adapter[f"base_model.model.{module}.lora_{x}.weight"].double() for x in "BA")
    torch.testing.assert_close(b @ a, want, rtol=1e-4, atol=1e-6)
    error = delta - b @ a
    assert float(torch.trace(error @ system @ error.T)) == pytest.approx(least, rel=1e-3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["peft_type"] == "LORA"


def test_low_rank_update_without_a_metric_is_the_truncated_svd():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    got = low_rank_update(delta, 3)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(got.b @ got.a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    assert got.lost == pytest.approx(float(s[3:].square().sum()))
    assert got.total == pytest.approx(float(delta.square().sum()))
    # with a metric: the reported loss is the update's, and no nearby rank-3 matrix does better
    m = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    system = m @ m.T + 0.1 * torch.eye(7, dtype=torch.float64)
    got = low_rank_update(delta, 3, torch.linalg.cholesky(system))

    def loss(x: torch.Tensor) -> float:
        return float(torch.trace((delta - x) @ system @ (delta - x).T))

    assert loss(got.b @ got.a) == pytest.approx(got.lost, rel=1e-9)
    for _ in range(20):
        b = got.b + 1e-3 * torch.randn(got.b.shape, generator=gen, dtype=torch.float64)
        a = got.a + 1e-3 * torch.randn(got.a.shape, generator=gen, dtype=torch.float64)
        assert loss(b @ a) >= got.lost


@pytest.fixture
def full_bert(tmp_path):
    """A base and two full fine-tunes of a BERT classifier, with statistics."""
    cls = "BertForSequenceClassification"
    base = save_model(build_model("bert", cls), tmp_path / "in" / "base")
    folders = [save_model(build_model("bert", cls, seed=k + 1), tmp_path / "in" / f"m{k}") for k in range(2)]
    stats = [_statistics(tmp_path, f, f"in/s{k}", None) for k, f in enumerate(folders)]
    return tmp_path, base, folders, stats


def test_full_fine_tunes_as_one_adapter(full_bert):
    """Linear weights become updates (biases lora_B.bias), norms, position embeddings and the head are saved whole,
    the (tied) word embeddings stay the base's, said with how far the merge moved them; at full rank the folded
    adapter is the merge."""
    root, base, folders, stats = full_bert
    full = load_file(_merge(root, "regmean", folders, stats, base, "full") / "model.safetensors")
    out = _merge(root, "regmean", folders, stats, base, "lora", "--lora-rank", 4096)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] and "classifier" in config["modules_to_save"]
    assert {"bert.embeddings.LayerNorm", "bert.embeddings.position_embeddings"} <= set(config["modules_to_save"])
    folded, base_weights = _folded("bert", base, out), load_file(base / "model.safetensors")
    report = json.loads((out / "merge_report.json").read_text())
    kept = {n["tensor"]: (n["lost"] / n["total"]) ** 0.5 for n in report["output_notes"] if n["kind"] == "kept base"}
    assert set(kept) == {"bert.embeddings.word_embeddings.weight"}
    assert all(change > 0.01 for change in kept.values())  # the fine-tunes moved them: said, with how far
    for key, want in full.items():
        if key in folded:
            expected = base_weights[key] if key in kept else want
            torch.testing.assert_close(folded[key], expected, rtol=1e-5, atol=1e-5, msg=key)


def test_heads_keep_gives_one_adapter_per_model_with_its_head(full_bert):
    root, base, folders, stats = full_bert
    models = [{"path": str(f), "statistics": str(s)} for f, s in zip(folders, stats, strict=True)]
    recipe = {"method": "regmean", "models": models, "base_model": str(base), "heads": "keep"}
    recipe["output"] = {"lora": {"rank": 3}}
    result = run("merge", write_config(root, **recipe), root / "keep")
    assert result.exit_code == 0, result.output
    assert "adapter: " in result.output and "at rank 3" in result.output
    outs = sorted(p for p in (root / "keep").iterdir() if p.is_dir())
    assert [p.name for p in outs] == ["m0", "m1"]
    tensors = [load_file(p / "adapter_model.safetensors") for p in outs]
    for own, folder in zip(tensors, folders, strict=True):
        head = load_file(folder / "model.safetensors")["classifier.weight"]
        torch.testing.assert_close(own["base_model.model.classifier.weight"], head, rtol=0, atol=0)
    body = [k for k in tensors[0] if "lora_" in k]
    assert body and all(torch.equal(tensors[0][k], tensors[1][k]) for k in body)  # one merged body


def test_an_adapter_needs_a_base(full_bert):
    from test_bad_input import merge_fails

    root, base, folders, stats = full_bert
    models = [{"path": str(f), "statistics": str(s)} for f, s in zip(folders, stats, strict=True)]
    recipe = {"method": "regmean", "models": models, "output": {"lora": {"rank": 4}}}
    merge_fails(root, recipe, "output.lora writes an adapter over a base model: give base_model")
    merge_fails(root, {**recipe, "base_model": str(base), "output": {"lora": {"rank": 0}}}, "output.lora.rank")


def test_targets_with_and_without_biases_fold_as_the_merge(tmp_path):
    """Qwen2: q, k, v have biases, o and the MLP none. peft's lora_bias is one flag for all targets, so the layers
    whose biases changed are saved whole and the others are updates: the folded adapter is still the merge."""
    import transformers as tf
    from architectures import DECODER
    from conftest import VOCAB, save_model
    from test_lora import _statistics

    def qwen(seed: int):
        torch.manual_seed(1234)
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**DECODER, "vocab_size": VOCAB + 8})).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 else 1.0) * bool(seed))
        return model

    base = save_model(qwen(0), tmp_path / "in" / "base")
    folders = [save_model(qwen(k + 1), tmp_path / "in" / f"m{k}") for k in range(2)]
    stats = [_statistics(tmp_path, f, f"in/s{k}", None) for k, f in enumerate(folders)]
    full = load_file(_merge(tmp_path, "regmean", folders, stats, base, "full") / "model.safetensors")
    out = _merge(tmp_path, "regmean", folders, stats, base, "lora", "--lora-rank", 64)
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["lora_bias"] and "model.layers.0.self_attn.q_proj" in config["modules_to_save"]
    model = peft.PeftModel.from_pretrained(tf.Qwen2ForCausalLM.from_pretrained(base), out).merge_and_unload()
    folded, base_weights = model.state_dict(), load_file(base / "model.safetensors")
    notes = json.loads((out / "merge_report.json").read_text())["output_notes"]
    kept = {n["tensor"] for n in notes if n["kind"] == "kept base"}
    for key, want in full.items():
        expected = base_weights[key] if key in kept else want
        torch.testing.assert_close(folded[key], expected, rtol=1e-5, atol=1e-5, msg=key)
