"""What a statistics file reveals (the bag-of-words decode) and the two protections (withholding, DP)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import transformers as tf
from conftest import ALL_SITES, TEXTS, VOCAB, _config, save_model, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

import regmean
from regmean.cli import app
from regmean.combine import combine
from regmean.io.data import Example
from regmean.measure import measure
from regmean.measure.protect import Protection
from regmean.privacy import dp
from regmean.privacy.audit import audit
from regmean.privacy.decode import decode_counts
from regmean.privacy.tokensites import token_sites, token_vectors
from regmean.stats import StatisticsFile, pack_upper, save


def _decoder(tmp_path, seed: int = 0):
    """The tiny test Llama, 48 wide: wide enough that a few dozen token counts are the only non-negative fit of its
    first Gram (2,080 equations)."""
    config = _config("llama")
    config.hidden_size, config.intermediate_size = 48, 64
    torch.manual_seed(seed)
    return save_model(tf.LlamaForCausalLM(config).eval(), tmp_path / f"decoder{seed}")


def _perturbed(path, tmp_path):
    """The model at `path` fine-tuned stand-in: every weight moved a little, saved beside it."""
    model = tf.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_model(model, tmp_path / "perturbed")


def test_decode_recovers_known_counts_exactly(tmp_path):
    model = tf.LlamaForCausalLM.from_pretrained(_decoder(tmp_path)).eval()
    (site,) = token_sites(model, ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"], VOCAB)
    assert site.name == "model.layers.0.self_attn.q_proj" and not site.positional
    # the oracle, written plainly: the layer's input for token t is RMSNorm(embedding[t]) * w
    with torch.no_grad():
        u = model.model.layers[0].input_layernorm(model.model.embed_tokens.weight).double()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randperm(VOCAB, generator=gen)[:40]
    counts = torch.randint(1, 30, (40,), generator=gen).double()
    gram = u[tokens].T @ (counts[:, None] * u[tokens])
    atoms = token_vectors(model, site, VOCAB, 1)
    assert torch.allclose(atoms.double(), u.float().double(), atol=1e-5)
    decoded = decode_counts(atoms, gram)
    assert decoded.converged and decoded.residual < 1e-6
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[tokens] = counts
    assert torch.allclose(decoded.counts, expected, atol=1e-3)


def test_audit_of_a_measured_file_recovers_the_bag_of_words(tmp_path):
    path = _decoder(tmp_path)
    examples = [Example(t) for t in TEXTS]
    save(measure(path, examples, progress=False, protection=ALL_SITES), tmp_path / "stats")
    result = audit(tmp_path / "stats", path, examples)
    (entry,) = result.sites
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    truth = Counter(i for t in TEXTS for i in tokenizer(t)["input_ids"])
    assert entry.tokens() == truth  # every distinct token, every count
    assert entry.score()["recall"] == entry.score()["precision"] == 1.0


@pytest.mark.parametrize("owners", ["every", "one"])
def test_withheld_token_sites_leave_nothing_to_decode_and_merge_as_averages(tmp_path, owners):
    """Whether every owner withheld or only one (sweep finding S07: refused, blaming include/exclude), the token
    sites' layers are averaged and said."""
    paths = [_decoder(tmp_path)]
    paths.append(_perturbed(paths[0], tmp_path))
    state, perturbed = (load_file(p / "model.safetensors") for p in paths)
    examples = [Example(t) for t in TEXTS]
    for i, p in enumerate(paths):
        stats = measure(p, examples, progress=False, protection=Protection(withhold=owners == "every" or i == 0))
        save(stats, tmp_path / f"s{i}")
    opened = StatisticsFile(tmp_path / "s0")
    assert "model.layers.0.self_attn.q_proj" not in opened.site_names
    assert opened.privacy["withheld"] == ["model.layers.0.self_attn.q_proj"]
    assert "withheld token sites" in opened.protection
    result = audit(tmp_path / "s0", paths[0], examples)
    assert result.sites == [] and [s.name for s in result.withheld] == ["model.layers.0.self_attn.q_proj"]
    models = [{"path": str(p), "statistics": str(tmp_path / f"s{i}")} for i, p in enumerate(paths)]
    report = regmean.merge(regmean.MergeConfig(models=models), tmp_path / "merged", progress=False)
    for projection in ("q_proj", "k_proj", "v_proj"):
        why = report.averaged[f"model.layers.0.self_attn.{projection}.weight"]
        assert why == "linear layer whose statistics the owners withheld (a token site)"
    assert any("withheld by the owners" in note and "q_proj" in note for note in report.notes)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged[key], (state[key] + perturbed[key]) / 2, atol=1e-6)


def _analytic_delta(sigma: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism with sensitivity 1 and noise std sigma (Balle and Wang, 2018)."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return phi(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * phi(-1 / (2 * sigma) - epsilon * sigma)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 16.0])
def test_noise_multiplier_is_the_tight_gaussian_calibration(epsilon):
    delta = 1e-5
    sigma = dp.calibrate(epsilon, delta)
    assert _analytic_delta(sigma, epsilon) <= delta * 1.001  # private at the stated budget
    assert _analytic_delta(sigma * 0.98, epsilon) > delta  # and not much noisier than it must be
    if epsilon < 1:  # the classical bound (Dwork and Roth, Theorem A.1) holds there and is looser
        assert sigma <= math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def test_bad_budgets_are_refused():
    with pytest.raises(regmean.RegmeanError, match="--dp-epsilon"):
        dp.calibrate(0.0, 1e-5)
    with pytest.raises(regmean.RegmeanError, match="protects nothing"):
        dp.calibrate(1e6, 1e-5)
    with pytest.raises(regmean.RegmeanError, match="--dp-delta"):
        dp.calibrate(1.0, 1.5)
    dp.check_delta_for(0.009, 100)  # below 1/n
    with pytest.raises(regmean.RegmeanError, match="not below 1/100"):
        dp.check_delta_for(0.01, 100)


def _site_moves(a, b) -> dict[str, float]:
    """How far each site's released numbers (packed Gram and sum; counts aside) moved from `a` to `b`."""
    return {
        n: float(torch.cat([pack_upper(b.sites[n].gram - s.gram), b.sites[n].sum - s.sum]).double().norm())
        for n, s in a.sites.items()
    }


def test_clipping_bounds_what_one_huge_example_adds(tmp_path, monkeypatch):
    path = _decoder(tmp_path)
    monkeypatch.setattr(dp, "calibrate", lambda epsilon, delta: 0.0)  # no noise: the clipped sums themselves
    asked = Protection(epsilon=1.0, clip=0.05)
    base = [Example(t) for t in TEXTS]
    loud = Example(" ".join(["zebra"] * 60))  # 60 equal rows at every site: a Gram of 3,600 u u^T
    without = measure(path, base, progress=False, protection=asked, stats_dtype="float64")
    with_it = measure(path, [*base, loud], progress=False, protection=asked, stats_dtype="float64")
    bounds = with_it.privacy["site_bounds"]
    assert bounds == without.privacy["site_bounds"] and set(bounds) == set(with_it.sites)  # from the model alone
    moved = _site_moves(without, with_it)
    assert all(moved[n] <= bounds[n] * (1 + 1e-6) for n in moved)  # at every site, at most its bound
    assert all(moved[n] >= 0.5 * bounds[n] for n in moved)  # and the huge example does reach it
    assert with_it.privacy["clipped_examples"] >= 1 and with_it.privacy["dp"]["clip"] == 0.05
    plain = [
        measure(path, b, progress=False, protection=ALL_SITES, stats_dtype="float64") for b in (base, [*base, loud])
    ]
    unclipped = _site_moves(*plain)
    assert all(unclipped[n] > 100 * bounds[n] for n in moved)  # unclipped, it moves far


def noise_in_bounds(noisy, exact) -> torch.Tensor:
    """The noise on every site's sum, in multiples of the std the file records for that site."""
    release, bounds = noisy.privacy["dp"], noisy.privacy["site_bounds"]
    parts = [(noisy.site(n) if hasattr(noisy, "site") else noisy.sites[n]).sum - exact.sites[n].sum for n in bounds]
    return torch.cat([p / (release["relative_noise"] * bounds[n]) for p, n in zip(parts, bounds, strict=True)])


def test_noise_has_the_recorded_scale_and_dp_files_merge(tmp_path, monkeypatch):
    paths = [_decoder(tmp_path)]
    paths.append(_perturbed(paths[0], tmp_path))
    examples = [Example(t) for t in TEXTS]
    asked = Protection(epsilon=1.0, delta=1e-5)
    noisy = measure(paths[0], examples, progress=False, protection=asked, stats_dtype="float64")
    release = noisy.privacy["dp"]
    assert release["noise_multiplier"] == pytest.approx(dp.calibrate(1.0, 1e-5))
    assert release["relative_noise"] == pytest.approx(
        release["noise_multiplier"] * math.sqrt(release["sites"]) / dp.GRAM_SHARE, rel=1e-3
    )
    calibrate = dp.calibrate
    monkeypatch.setattr(dp, "calibrate", lambda epsilon, delta: 0.0)  # the same clipping, no noise
    exact = measure(paths[0], examples, progress=False, protection=asked, stats_dtype="float64")
    monkeypatch.setattr(dp, "calibrate", calibrate)
    assert float(noise_in_bounds(noisy, exact).std()) == pytest.approx(1.0, rel=0.15)
    for name, site in noisy.sites.items():  # projected onto the PSD cone: no negative eigenvalue
        assert float(torch.linalg.eigvalsh(site.gram).min()) >= -1e-8 * float(site.gram.abs().max()), name
    for i, p in enumerate(paths):
        save(measure(p, examples, progress=False, protection=asked), tmp_path / f"s{i}")
    models = [{"path": str(p), "statistics": str(tmp_path / f"s{i}")} for i, p in enumerate(paths)]
    for options in ({}, {"bias": "joint"}):  # joint: the affine Gram of noisy sums need not be PSD (not proven)
        out = tmp_path / f"merged{len(options)}"
        regmean.merge(regmean.MergeConfig(models=models, options=options), out, progress=False)
        merged = load_file(out / "model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_combine_keeps_the_budget_of_disjoint_parts_and_refuses_mixed_ones(tmp_path):
    path = _decoder(tmp_path)
    first, second = write_jsonl(tmp_path / "a.jsonl", TEXTS[:5], ["x"] * 5), tmp_path / "b.jsonl"
    write_jsonl(second, TEXTS[5:], ["x"] * 5)
    runner = CliRunner()
    common = ["measure", str(path), "--dp-epsilon", "2"]
    for name, data in (("a", first), ("b", second)):
        result = runner.invoke(app, [*common, "--data", str(data), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    total = combine([tmp_path / "a", tmp_path / "b"])
    assert total.privacy["dp"]["epsilon"] == 2 and "parallel composition" in total.protection
    result = runner.invoke(app, ["measure", str(path), "--data", str(second), "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    with pytest.raises(regmean.RegmeanError, match="another privacy budget"):
        combine([tmp_path / "a", tmp_path / "plain"])
    result = runner.invoke(app, [*common, "--data", str(first), "--out", str(tmp_path / "again")])
    with pytest.raises(regmean.RegmeanError, match="whose budgets add up"):
        combine([tmp_path / "a", tmp_path / "again"])


def test_cli_audit_reports_recall_and_measure_warns(tmp_path):
    path = _decoder(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl")
    runner = CliRunner()
    measure = ["measure", str(path), "--data", str(data), "--out"]
    result = runner.invoke(app, [*measure, str(tmp_path / "default")])  # token sites withheld by default
    assert result.exit_code == 0 and "protection: withheld token sites: model.layers.0" in result.output
    assert "decodes" not in result.output
    result = runner.invoke(app, [*measure, str(tmp_path / "s"), "--expose-token-counts"])
    assert result.exit_code == 0 and "decodes into your data's token counts" in result.output
    out = tmp_path / "audit.json"
    args = ["stats", "audit", str(tmp_path / "s"), "--model", str(path), "--data", str(data), "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recall 1.000" in result.output and "precision 1.000" in result.output
    assert out.is_file()
    result = runner.invoke(app, args)  # never written over
    assert result.exit_code == 2 and "exists" in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-epsilon", "0"], "--dp-epsilon must be a positive number"),
        (["--dp-epsilon", "1", "--dp-delta", "2"], "--dp-delta must be a positive number up to 0.01"),
        (["--dp-epsilon", "1", "--dp-delta", "0.999"], "--dp-delta must be a positive number up to 0.01"),
        (["--dp-delta", "0.5"], "give --dp-epsilon with it"),
        (["--dp-epsilon", "1", "--dp-clip", "-3"], "--dp-clip must be a positive number"),
        (["--dp-clip", "2"], "give --dp-epsilon"),
    ],
)
def test_bad_privacy_flags_are_refused_before_any_work(tmp_path, flags, message):
    args = ["measure", str(tmp_path / "missing-model"), "--data", str(tmp_path / "missing.jsonl")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s"), *flags])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "s").exists()


def test_measure_warns_when_the_noise_is_of_the_order_of_the_data(tmp_path):
    """Sweep 4 F6: 10 examples at epsilon 8 carry noise of hundreds of tokens on 81: said in one line; 10 examples
    without DP say nothing of the kind."""
    from conftest import build_model

    model = save_model(build_model("bert", "BertForSequenceClassification"), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    runner = CliRunner()
    noisy = runner.invoke(
        app, ["measure", str(model), "--data", str(data), "--out", str(tmp_path / "dp"), "--dp-epsilon", "8"]
    )
    plain = runner.invoke(app, ["measure", str(model), "--data", str(data), "--out", str(tmp_path / "plain")])
    assert noisy.exit_code == 0 and plain.exit_code == 0, noisy.output + plain.output
    said = " ".join(noisy.output.split())
    assert "warning: the DP noise (about" in said and "is of the order of the data" in said
    assert "DP noise" not in plain.output
