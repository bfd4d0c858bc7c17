"""End-to-end merges through the CLI for every family, checked against the normal equations and the definitions."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from conftest import ALL_SITES, CASE_IDS, CASES, TARGETS, TEXTS, build_model, save_model, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from regmean.cli import app
from regmean.errors import RegmeanError
from regmean.io.data import Example
from regmean.measure import measure
from regmean.stats import StatisticsFile, save

K = 3
EXAMPLES = [Example(t, None, y) for t, y in zip(TEXTS, TARGETS, strict=True)]
runner = CliRunner()


def make_models(root: Path, family: str, cls: str, num_labels=(3, 3, 3), stats=True) -> list[dict]:
    entries = []
    for k in range(K):
        path = save_model(build_model(family, cls, seed=k + 1, num_labels=num_labels[k]), root / f"ft{k}")
        entry = {"path": str(path)}
        if stats:
            part = EXAMPLES[k * 3 : k * 3 + 4]
            save(measure(path, part, batch_size=2, progress=False, protection=ALL_SITES), root / f"stats{k}")
            entry["statistics"] = str(root / f"stats{k}")
        entries.append(entry)
    return entries


def write_config(root: Path, **recipe) -> Path:
    path = root / "merge.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G), written plainly."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def normal_equation_residual(merged: torch.Tensor, weights: list[torch.Tensor], grams: list[torch.Tensor], scale):
    """|| sum_i s_i G~_i (W - W_i)^T || / || sum_i s_i G~_i W_i^T ||, with W in nn.Linear layout."""
    res = sum(s * g @ (merged - w).T for s, g, w in zip(scale, grams, weights, strict=True))
    ref = sum(s * g @ w.T for s, g, w in zip(scale, grams, weights, strict=True))
    return float(res.norm() / ref.norm())


@pytest.mark.parametrize(("family", "cls"), CASES, ids=CASE_IDS)
def test_regmean_merge_every_family(tmp_path, family, cls):
    models = make_models(tmp_path, family, cls)
    alpha = 0.9
    config = write_config(tmp_path, method="regmean", models=models, options={"alpha": alpha})
    result = run("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "merge_config.yaml",
        "merge_report.json",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name

    merged_model = getattr(tf, cls).from_pretrained(out).eval()
    tok = tf.AutoTokenizer.from_pretrained(out)
    batch = tok(TEXTS[:2], padding=True, return_tensors="pt")
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if cls == "T5ForConditionalGeneration":
        kwargs["decoder_input_ids"] = batch["input_ids"][:, :3]
    with torch.no_grad():
        assert torch.isfinite(merged_model(**kwargs).logits).all()

    merged = load_file(out / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    stats = [StatisticsFile(m["statistics"]) for m in models]
    conv1d = {n for n, m in merged_model.named_modules() if isinstance(m, tf.pytorch_utils.Conv1D)}
    checked = 0
    for module, site in stats[0].modules.items():
        key = f"{module}.weight"
        sites = [st.site(site) for st in stats]
        layout = (lambda t: t.T) if module in conv1d else (lambda t: t)
        grams = [shrink(s.gram.double(), alpha) for s in sites]
        scale = [1.0 / s.count for s in sites]  # default gram_weighting: mean
        weights = [layout(sd[key]).double() for sd in inputs]
        assert normal_equation_residual(layout(merged[key]).double(), weights, grams, scale) < 1e-4, module
        checked += 1
    assert checked == len(stats[0].modules) > 0
    # nothing silent: every other matrix is listed as averaged, with its reason
    report = json.loads((out / "merge_report.json").read_text())
    solved = {f"{row['module']}.weight" for row in report["layers"]}
    matrices = {key for key, t in merged.items() if t.dim() >= 2}
    assert solved | set(report["averaged"]) == matrices and not solved & set(report["averaged"])
    assert all(report["averaged"].values())
    # every other float tensor is the simple average
    lin = {f"{m}.weight" for m in stats[0].modules}
    for key, t in merged.items():
        if key not in lin and t.is_floating_point():
            torch.testing.assert_close(t, torch.stack([sd[key] for sd in inputs]).mean(0), msg=key)


def test_conv1d_and_linear_give_the_same_merged_function(tmp_path):
    """GPT-2's Conv1D c_fc merged by the engine equals merging the same layer written as nn.Linear weights."""
    from regmean.methods.least_squares import regmean_solve

    models = make_models(tmp_path, "gpt2", "GPT2LMHeadModel")
    config = write_config(tmp_path, method="regmean", models=models, options={"alpha": 1.0, "gram_weighting": "sum"})
    assert run("merge", config, tmp_path / "out").exit_code == 0
    key, site = "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc"
    conv = torch.stack([load_file(Path(m["path"]) / "model.safetensors")[key] for m in models])  # [K, in, out]
    grams = torch.stack([StatisticsFile(m["statistics"]).site(site).gram for m in models])
    linear = regmean_solve(conv.transpose(1, 2), grams, torch.ones(K), torch.ones(K), alpha=1.0).merged
    merged_conv = load_file(tmp_path / "out" / "model.safetensors")[key]
    x = torch.randn(5, conv.shape[1], dtype=torch.float64)
    torch.testing.assert_close(x @ merged_conv.double(), x @ linear.T, rtol=1e-5, atol=1e-5)


def test_joint_bias_and_sum_weighting_satisfy_the_affine_normal_equations(tmp_path):
    from regmean.methods.least_squares import affine_gram

    models = make_models(tmp_path, "bert", "BertForSequenceClassification")
    options = {"alpha": 1.0, "bias": "joint", "gram_weighting": "sum"}
    assert (
        run("merge", write_config(tmp_path, method="regmean", models=models, options=options), tmp_path / "o").exit_code
        == 0
    )
    merged = load_file(tmp_path / "o" / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    module = "bert.encoder.layer.1.intermediate.dense"
    sites = [StatisticsFile(m["statistics"]).site(module) for m in models]
    grams = [affine_gram(s.gram.double(), s.sum.double(), s.count) for s in sites]

    def wb(sd):
        return torch.cat([sd[module + ".weight"], sd[module + ".bias"][:, None]], 1).double()

    assert normal_equation_residual(wb(merged), [wb(sd) for sd in inputs], grams, [1.0] * K) < 1e-4
    assert not torch.allclose(merged[module + ".bias"], torch.stack([sd[module + ".bias"] for sd in inputs]).mean(0))


def test_heads_keep_gives_each_model_the_merged_body_and_its_own_head(tmp_path):
    models = make_models(tmp_path, "bert", "BertForSequenceClassification", num_labels=(2, 3, 4))
    config = write_config(tmp_path, method="regmean", models=models, heads="keep")
    result = run("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    outs = [tmp_path / "out" / f"ft{k}" for k in range(K)]
    merged = [load_file(o / "model.safetensors") for o in outs]
    for k, o in enumerate(outs):
        model = tf.AutoModelForSequenceClassification.from_pretrained(o)
        assert model.config.num_labels == k + 2
        own = load_file(Path(models[k]["path"]) / "model.safetensors")
        assert torch.equal(merged[k]["classifier.weight"], own["classifier.weight"])
        for key in merged[0]:
            if not key.startswith("classifier."):
                assert torch.equal(merged[k][key], merged[0][key]), key
    # options left out are recorded resolved: the card and the recipe say which alpha was used
    recipe = yaml.safe_load((outs[0] / "merge_config.yaml").read_text())
    resolved = {"alpha": 0.9, "gram_weighting": "mean", "bias": "average", "diagnostics": "sampled"}
    assert recipe["options"] == resolved | {"verify_grams": True}
    card = (outs[0] / "README.md").read_text()
    assert "- alpha: `0.9`" in card
    assert "- model 2: examples=4, tokens=" in card  # each model's statistics provenance


def test_average_and_task_arithmetic(tmp_path):
    models = make_models(tmp_path, "llama", "LlamaForCausalLM", stats=False)
    base = save_model(build_model("llama", "LlamaForCausalLM", seed=0), tmp_path / "base")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    base_sd = load_file(base / "model.safetensors")
    models[2]["weight"] = 2.0
    avg = write_config(tmp_path, method="average", models=models)
    assert run("merge", avg, tmp_path / "avg").exit_code == 0
    ta = write_config(tmp_path, method="task_arithmetic", models=models, base_model=str(base), options={"scaling": 0.3})
    assert run("merge", ta, tmp_path / "ta").exit_code == 0
    got_avg = load_file(tmp_path / "avg" / "model.safetensors")
    got_ta = load_file(tmp_path / "ta" / "model.safetensors")
    w = [1.0, 1.0, 2.0]
    for key in base_sd:
        expect = sum(wi * sd[key] for wi, sd in zip(w, inputs, strict=True)) / 4
        torch.testing.assert_close(got_avg[key], expect)
        delta = sum(wi * (sd[key] - base_sd[key]) for wi, sd in zip(w, inputs, strict=True))
        torch.testing.assert_close(got_ta[key], base_sd[key] + 0.3 * delta)
    assert tf.LlamaForCausalLM.from_pretrained(tmp_path / "ta").config.tie_word_embeddings


def test_python_api_matches_cli(tmp_path):
    import regmean

    models = make_models(tmp_path, "distilbert", "DistilBertForSequenceClassification")
    cfg = regmean.MergeConfig(method="regmean", models=models, options={"alpha": 0.5})
    report = regmean.merge(cfg, tmp_path / "api", progress=False)
    assert run("merge", write_config(tmp_path, **cfg.model_dump(mode="json")), tmp_path / "cli").exit_code == 0
    a, b = load_file(tmp_path / "api" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert report.summary().solved_layers == 14
    # only the classifier (it reads ReLU outputs with dead units: zero Gram diagonal) needs and reports a ridge
    assert {row.module for row in report.layers if row.ridge > 0} <= {"classifier"}


def test_measure_show_combine_cli(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    first = write_jsonl(tmp_path / "d1.jsonl", TEXTS[:5], TARGETS[:5])
    second = write_jsonl(tmp_path / "d2.jsonl", TEXTS[5:], TARGETS[5:])
    common = ["--stats-dtype", "float64", "--model-dtype", "float64", "--batch-size", "3"]
    for d, out in ((data, "all"), (first, "s1"), (second, "s2")):
        result = run("measure", path, "--data", d, "--out", tmp_path / out, *common)
        assert result.exit_code == 0, result.output
    assert run("stats", "combine", tmp_path / "s1", tmp_path / "s2", "--out", tmp_path / "sum").exit_code == 0
    whole, summed = StatisticsFile(tmp_path / "all"), StatisticsFile(tmp_path / "sum")
    assert (whole.examples, whole.tokens) == (summed.examples, summed.tokens)
    for site in whole.site_names:
        torch.testing.assert_close(whole.site(site).gram, summed.site(site).gram, rtol=1e-12, atol=1e-10)
    shown = runner.invoke(app, ["stats", "show", str(tmp_path / "sum")], env={"COLUMNS": "250"})
    assert shown.exit_code == 0
    assert "bert.encoder.layer.0.attention.self.query" in shown.output and "float64" in shown.output
    assert "query, key, value" in shown.output
    narrow = runner.invoke(app, ["stats", "show", str(tmp_path / "sum")], env={"COLUMNS": "80"}).output
    assert re.search(rf"16x16 +│ +{summed.tokens} │", narrow) and "24x24" in narrow  # shapes and rows fit 80 columns
    assert "d1.jsonl" in shown.output and "d2.jsonl" in shown.output
    # an existing statistics file is not replaced without --force
    again = run("measure", path, "--data", data, "--out", tmp_path / "all")
    assert again.exit_code != 0 and "--force" in again.output


def test_bfloat16_inputs_keep_their_dtype_unless_asked(tmp_path):
    models = []
    for k in range(2):
        model = build_model("llama", "LlamaForCausalLM", seed=k + 1).to(torch.bfloat16)
        path = save_model(model, tmp_path / f"ft{k}")
        save(
            measure(path, EXAMPLES, batch_size=4, model_dtype="bfloat16", progress=False, protection=ALL_SITES),
            tmp_path / f"s{k}",
        )
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    assert run("merge", write_config(tmp_path, method="regmean", models=models), tmp_path / "bf").exit_code == 0
    assert {t.dtype for t in load_file(tmp_path / "bf" / "model.safetensors").values()} == {torch.bfloat16}
    config = write_config(tmp_path, method="regmean", models=models, dtype="float32")
    assert run("merge", config, tmp_path / "fp").exit_code == 0
    assert {t.dtype for t in load_file(tmp_path / "fp" / "model.safetensors").values()} == {torch.float32}


def test_head_modules_override(tmp_path):
    models = make_models(tmp_path, "bert", "BertForSequenceClassification", num_labels=(2, 3, 4))
    recipe = {"method": "regmean", "models": models, "heads": "keep", "head_modules": ["classifier", r"bert\.pooler.*"]}
    assert run("merge", write_config(tmp_path, **recipe), tmp_path / "out").exit_code == 0
    own = load_file(Path(models[1]["path"]) / "model.safetensors")
    got = load_file(tmp_path / "out" / "ft1" / "model.safetensors")
    assert torch.equal(got["bert.pooler.dense.weight"], own["bert.pooler.dense.weight"])  # kept, not merged
    other = load_file(tmp_path / "out" / "ft0" / "model.safetensors")
    assert not torch.equal(got["bert.pooler.dense.weight"], other["bert.pooler.dense.weight"])


def test_untied_lm_head_and_embedding_options(tmp_path):
    import conftest

    config = conftest._config("llama")
    config.tie_word_embeddings = False
    models = []
    for k in range(3):
        torch.manual_seed(k)
        path = save_model(tf.LlamaForCausalLM(config), tmp_path / f"ft{k}")
        save(measure(path, EXAMPLES, batch_size=4, progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    assert "lm_head" in StatisticsFile(models[0]["statistics"]).modules  # untied: measured like any linear
    base = save_model(tf.LlamaForCausalLM(config), tmp_path / "base")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    mean = {k: torch.stack([sd[k] for sd in inputs]).mean(0) for k in inputs[0]}

    def merged(name, **recipe):
        assert (
            run("merge", write_config(tmp_path, method="regmean", models=models, **recipe), tmp_path / name).exit_code
            == 0
        )
        return load_file(tmp_path / name / "model.safetensors")

    default = merged("default")
    torch.testing.assert_close(default["lm_head.weight"], mean["lm_head.weight"])  # LM head averaged by default
    solved = merged("solved", lm_head="regmean")
    assert not torch.allclose(solved["lm_head.weight"], mean["lm_head.weight"])
    grams = [StatisticsFile(m["statistics"]).site("lm_head") for m in models]
    residual = normal_equation_residual(
        solved["lm_head.weight"].double(),
        [sd["lm_head.weight"].double() for sd in inputs],
        [shrink(g.gram.double(), 0.9) for g in grams],
        [1 / g.count for g in grams],
    )
    assert residual < 1e-4
    from_base = merged("from_base", base_model=str(base), embeddings="base", lm_head="base")
    base_sd = load_file(base / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(from_base[key], base_sd[key])


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_merge_is_the_elementwise_fisher_weighted_average(tmp_path, normalize):
    """Through the engine, with weights: sum_i w_i F_i W_i / sum_i w_i F_i per entry; a tensor some model has no
    Fisher for is the weighted average. With `normalize`, each F_i is first divided by its L2 norm over its file."""
    from regmean.measure.fisher import save_fisher

    models = make_models(tmp_path, "gpt2", "GPT2ForSequenceClassification", stats=False)
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    fishers = []
    for k, (entry, sd) in enumerate(zip(models, inputs, strict=True)):
        gen = torch.Generator().manual_seed(k)
        # Fishers of very different scales: normalizing them changes the merge
        fisher = {n: 10.0**k * torch.rand(t.shape, generator=gen) ** 3 for n, t in sd.items() if t.is_floating_point()}
        if k == 1:
            del fisher["transformer.wte.weight"]
        save_fisher(fisher, entry["path"], tmp_path / f"fisher{k}", examples=5)
        entry["statistics"], entry["weight"] = str(tmp_path / f"fisher{k}"), float(k + 1)
        fishers.append(fisher)
    config = write_config(tmp_path, method="fisher", models=models, options={"normalize": normalize})
    assert run("merge", config, tmp_path / "out").exit_code == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    w = [1.0, 2.0, 3.0]
    if normalize:  # the naive way: every entry of the model's Fisher, squared and summed
        fishers = [
            {n: f / sum((x.double() ** 2).sum() for x in fi.values()) ** 0.5 for n, f in fi.items()} for fi in fishers
        ]
    for key, got in merged.items():
        if not got.is_floating_point():
            continue
        if key == "transformer.wte.weight":
            expect = sum(wi * sd[key].double() for wi, sd in zip(w, inputs, strict=True)) / 6
        else:
            num = sum(wi * f[key].double() * sd[key].double() for wi, f, sd in zip(w, fishers, inputs, strict=True))
            den = sum(wi * f[key].double() for wi, f in zip(w, fishers, strict=True))
            expect = num / den
        torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6, msg=key)


def test_sampled_diagnostics_change_no_tensor_and_match_exact_ones_where_every_row_is_checked(tmp_path):
    import regmean

    models = make_models(tmp_path, "llama", "LlamaForCausalLM")
    reports, tensors = {}, {}
    for mode in ("sampled", "exact"):
        cfg = regmean.MergeConfig(method="regmean", models=models, options={"diagnostics": mode})
        reports[mode] = regmean.merge(cfg, tmp_path / mode, progress=False)
        tensors[mode] = load_file(tmp_path / mode / "model.safetensors")
    for key, t in tensors["exact"].items():
        assert torch.equal(t, tensors["sampled"][key]), key
    sampled = 0
    for s, e in zip(reports["sampled"].layers, reports["exact"].layers, strict=True):
        d_out = tensors["exact"][f"{e.module}.weight"].shape[0]
        assert e.checked_rows == d_out and not any(e.error_stderr) and e.residual < 1e-10
        assert s.residual < 1e-10
        if s.checked_rows == d_out:
            assert s.relative_error == e.relative_error
        else:
            sampled += 1
            assert s.checked_rows < d_out and all(x > 0 for x in s.error_stderr)
            for est, se, exact in zip(s.relative_error, s.error_stderr, e.relative_error, strict=True):
                assert abs(est - exact) < 5 * se
    assert sampled > 0 and reports["sampled"].summary().sampled_layers == sampled
    assert reports["exact"].summary().sampled_layers == 0
    card = (tmp_path / "sampled" / "README.md").read_text()
    assert "estimated on sampled output rows" in card and "relative residual" in card
    # identical models: every error and standard error is 0, and the sampled layers are still said to be sampled
    same = regmean.MergeConfig(method="regmean", models=[models[0], models[0]])
    assert regmean.merge(same, tmp_path / "same", progress=False).summary().sampled_layers == sampled


def test_device_option_cpu_is_the_default_and_a_missing_device_is_refused_before_any_work(tmp_path):
    from regmean.merge.plan import MergePlan, check_memory

    models = make_models(tmp_path, "bert", "BertForSequenceClassification")
    config = write_config(tmp_path, method="regmean", models=models)
    assert run("merge", config, tmp_path / "default").exit_code == 0
    assert run("merge", config, tmp_path / "cpu", "--device", "cpu").exit_code == 0
    a, b = load_file(tmp_path / "default" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ties = tmp_path / "ties.yaml"
    ties.write_text(yaml.safe_dump({"method": "ties", "models": models, "base_model": models[0]["path"]}))
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [(config, "cuda:7", "device 'cuda:7'"), (config, "gpu", "not a device name"), (ties, "cuda", "CPU only")]
    cases.append((config, "mps", "cpu or cuda"))
    for recipe, device, says in cases:
        result = run("merge", recipe, tmp_path / "out", "--device", device)
        assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    # on a device, --max-memory applies to the device's working set and to the host's staging, each
    plan = MergePlan(1, 1, "", 0, 0.0, 0, working_bytes=900, prefetch_bytes=100, runtime_bytes=50, device="cuda:0")
    assert (plan.device_bytes, plan.peak_bytes) == (1000, 250)
    check_memory(plan, 1000)
    with pytest.raises(RegmeanError, match="on cuda:0"):
        check_memory(plan, 999)
    with pytest.raises(RegmeanError, match="exceeds --max-memory"):
        check_memory(MergePlan(1, 1, "", 0, 0.0, 0, 900, 100, 50), 999)
