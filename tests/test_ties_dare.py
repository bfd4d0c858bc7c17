"""TIES and DARE: hand-computed cases, a plainly written in-memory oracle, exact trimming over row blocks, seeds."""

from pathlib import Path

import pytest
import torch
from conftest import build_model, save_model
from safetensors.torch import load_file
from test_merge import make_models

import regmean
from regmean.errors import RegmeanError
from regmean.methods import base as method_base
from regmean.methods.dare import keep_mask, stream_key
from regmean.methods.ties import elect_and_average, keep_count, kth_largest, kth_largest_streamed


def test_ties_by_hand():
    """density 0.5 keeps two of four entries per task vector; signs by total mass; mean of the agreeing ones."""
    tvs = [torch.tensor(v) for v in ([3.0, -2.0, 0.5, 1.0], [-1.0, -4.0, 2.0, 0.1], [2.0, 1.0, -3.0, 0.2])]
    k = keep_count(4, 0.5)
    assert k == 2 and keep_count(100, 0.07) == 7 and keep_count(10, 0.01) == 1 and keep_count(3, 1.0) == 3
    trimmed = [torch.where(tv.abs() >= kth_largest(tv.abs(), k), tv, 0.0) for tv in tvs]
    assert [t.tolist() for t in trimmed] == [[3, -2, 0, 0], [0, -4, 2, 0], [2, 0, -3, 0]]
    # total mass [5, -6, -1, 0]: entry 0 keeps models 0 and 2, entry 1 models 0 and 1, entry 2 model 2, entry 3 none
    got = elect_and_average(trimmed, torch.ones(3))
    assert got.tolist() == [2.5, -3.0, -3.0, 0.0]
    # weights: entry 0 = (1*3 + 3*2) / (1 + 3); entry 1: elected sign of 1*-2 + 1*-4 + 3*0 is negative
    weighted = elect_and_average(trimmed, torch.tensor([1.0, 1.0, 3.0]))
    assert weighted.tolist() == pytest.approx([9 / 4, -3.0, -3.0, 0.0])


@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_streamed_threshold_equals_the_whole_tensor_kth_value(k):
    g = torch.Generator().manual_seed(k)
    values = torch.randn(1000, generator=g).abs()
    values[::7] = 0.0  # many ties, at zero and elsewhere
    values[1::11] = 0.5
    other = values.flip(0) * 2  # a second stream read alongside: its own threshold
    streams = [[values[i : i + 130], other[i : i + 130]] for i in range(0, 1000, 130)]
    assert kth_largest_streamed(lambda: iter(streams), [k, k]) == [kth_largest(values, k), kth_largest(other, k)]
    assert kth_largest_streamed(lambda: iter(streams), [k, 1]) == [kth_largest(values, k), kth_largest(other, 1)]
    assert kth_largest(values, k) == float(values.sort(descending=True).values[k - 1])


def naive_ties(models: list[dict], base: dict, density: float | list[float], scaling: float) -> dict:
    """TIES written plainly over whole tensors: topk per task vector, sign of the sum, mean of the agreeing."""
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = models[0][key]
            continue
        tvs = [m[key].float() - b.float() for m in models]
        densities = density if isinstance(density, list) else [density] * len(models)
        kept = []
        for tv, own in zip(tvs, densities, strict=True):
            k = max(1, int(-(-own * b.numel() // 1)))
            threshold = tv.abs().flatten().topk(k).values[-1]
            kept.append(tv * (tv.abs() >= threshold))
        sign = torch.sign(sum(kept))
        agree = [(torch.sign(t) == sign) & (t != 0) for t in kept]
        count = sum(a.float() for a in agree)
        mean = sum(t * a for t, a in zip(kept, agree, strict=True)) / count.clamp_min(1)
        out[key] = (b.float() + scaling * mean).to(b.dtype)
    return out


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("llamas")
    models = make_models(root, "llama", "LlamaForCausalLM", stats=False)
    base = save_model(build_model("llama", "LlamaForCausalLM", seed=0), root / "base")
    return models, base


def merged(config: dict, out: Path) -> dict:
    regmean.merge(regmean.MergeConfig(**config), out, progress=False)
    return load_file(out / "model.safetensors")


def test_ties_merge_equals_a_naive_in_memory_ties(llamas, tmp_path):
    models, base = llamas
    config = {"method": "ties", "models": models, "base_model": str(base), "options": {"density": 0.3, "scaling": 0.8}}
    got = merged(config, tmp_path / "ties")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    expected = naive_ties(inputs, load_file(base / "model.safetensors"), 0.3, 0.8)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    assert "- density: `0.3`" in (tmp_path / "ties" / "README.md").read_text()


def test_ties_with_a_density_per_model_equals_the_naive_one(llamas, tmp_path):
    models, base = llamas
    densities = [0.2, 0.5, 0.9]
    own = [{**m, "options": {"density": d}} for m, d in zip(models, densities, strict=True)]
    got = merged({"method": "TIES", "models": own, "base_model": str(base)}, tmp_path / "ties")  # any case
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    expected = naive_ties(inputs, load_file(base / "model.safetensors"), densities, 1.0)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    for options, says in (({"scaling": 2}, "takes no per-model option 'scaling'"), ({"density": 2}, "less than or")):
        bad = [{**models[0], "options": options}, *models[1:]]
        with pytest.raises(RegmeanError, match=says):
            regmean.MergeConfig.parse({"method": "ties", "models": bad, "base_model": str(base)})


@pytest.mark.parametrize("options", [{"method": "ties"}, {"method": "dare", "options": {"combine": "ties"}}])
def test_row_blocks_give_the_whole_tensor_merge_bit_for_bit(llamas, tmp_path, monkeypatch, options):
    models, base = llamas
    config = {"models": models, "base_model": str(base), **options}
    whole = merged(config, tmp_path / "whole")
    monkeypatch.setattr(method_base, "BLOCK_BYTES", 1000)  # every matrix in blocks of a few rows
    assert method_base.row_blocks((64, 32), 4) is not None
    blocks = merged(config, tmp_path / "blocks")
    assert whole.keys() == blocks.keys()
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)


def test_dare_masks_drop_the_asked_fraction_reproducibly():
    key = stream_key(7, 0, "layer.weight")
    keep = keep_mask(key, 0, 200_000, 0.3)
    assert abs(float(keep.float().mean()) - 0.7) < 0.005
    assert torch.equal(keep[1000:2000], keep_mask(key, 1000, 1000, 0.3))  # a block is the whole tensor's slice
    assert not torch.equal(keep, keep_mask(stream_key(8, 0, "layer.weight"), 0, 200_000, 0.3))
    assert not torch.equal(keep, keep_mask(stream_key(7, 1, "layer.weight"), 0, 200_000, 0.3))
    across = keep_mask(key, 2**32 - 5, 10, 0.3)  # a block across a 2^32 boundary is its two halves
    assert torch.equal(across, torch.cat([keep_mask(key, 2**32 - 5, 5, 0.3), keep_mask(key, 2**32, 5, 0.3)]))
    # entries far beyond 2^32 hash too (the high word enters the mix)
    far = keep_mask(key, 2**33, 10_000, 0.3)
    assert not torch.equal(far, keep[:10_000]) and abs(float(far.float().mean()) - 0.7) < 0.03


def test_dare_rescales_the_kept_entries_and_is_seeded(llamas, tmp_path):
    models, base = llamas
    recipe = {"method": "dare", "models": models, "base_model": str(base)}
    opts = {"drop_rate": 0.6, "seed": 3, "scaling": 0.5}
    first = merged({**recipe, "options": opts}, tmp_path / "a")
    again = merged({**recipe, "options": opts}, tmp_path / "b")
    other = merged({**recipe, "options": {**opts, "seed": 4}}, tmp_path / "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
    assert "- seed: `3`" in (tmp_path / "a" / "README.md").read_text()
    # the oracle: base + scaling * sum_i mask_i * tau_i / (1 - p), with each model's own mask
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    base_sd = load_file(base / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    expected = base_sd[key].clone()
    for k, sd in enumerate(inputs):
        keep = keep_mask(stream_key(3, k, key), 0, expected.numel(), 0.6).reshape(expected.shape)
        expected += 0.5 * keep * (sd[key] - base_sd[key]) / 0.4
    torch.testing.assert_close(first[key], expected, rtol=1e-5, atol=1e-6)


def test_dare_without_drops_is_task_arithmetic_and_ties_without_trimming(llamas, tmp_path):
    models, base = llamas
    recipe = {"models": models, "base_model": str(base)}
    dare = merged({**recipe, "method": "dare", "options": {"drop_rate": 0.0, "scaling": 0.7}}, tmp_path / "d")
    ta = merged({**recipe, "method": "task_arithmetic", "options": {"scaling": 0.7}}, tmp_path / "t")
    dare_ties = merged({**recipe, "method": "dare", "options": {"drop_rate": 0.0, "combine": "ties"}}, tmp_path / "dt")
    ties = merged({**recipe, "method": "ties", "options": {"density": 1.0}}, tmp_path / "ti")
    for key in ta:
        torch.testing.assert_close(dare[key], ta[key], rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(dare_ties[key], ties[key]), key


def test_tensors_the_base_lacks_are_averaged(tmp_path):
    """A classifier head the base model does not have: no task vector, so the heads are averaged (as task
    arithmetic does), and the report lists them."""
    models = make_models(tmp_path, "bert", "BertForSequenceClassification", stats=False)
    body = build_model("bert", "BertForSequenceClassification", seed=0).bert
    base = save_model(body, tmp_path / "base")
    report = regmean.merge(
        regmean.MergeConfig(method="ties", models=models, base_model=str(base)), tmp_path / "o", progress=False
    )
    got = load_file(tmp_path / "o" / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    torch.testing.assert_close(got["classifier.weight"], sum(sd["classifier.weight"] for sd in inputs) / 3)
    assert report.base_missing == ["classifier.bias", "classifier.weight"]
