"""Statistics against an independent oracle: per-module hooks, one unpadded example at a time."""

import importlib
import inspect

import pytest
import torch
import transformers as tf
from conftest import ALL_SITES, CASE_IDS, CASES, TARGETS, TEXTS, build_model, save_model
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from regmean.cli import app
from regmean.combine import combine
from regmean.errors import RegmeanError
from regmean.io.data import Example
from regmean.measure import measure
from regmean.stats import PACK_ROWS, StatisticsFile, pack_upper, save, unpack_upper

EXAMPLES = [Example(t, None, y) for t, y in zip(TEXTS, TARGETS, strict=True)]


def oracle_grams(model_dir, model, names: list[str]) -> dict[str, torch.Tensor]:
    """Sum of x x^T per module over every row, feeding one example at a time (so there is no padding at all)."""
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    mods = dict(model.named_modules())
    grams = {n: 0 for n in names}

    def hook(name):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams[name] + x.T @ x

        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for text, target in zip(TEXTS, TARGETS, strict=True):
            enc = tok([text], return_tensors="pt", truncation=True, max_length=128)
            kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            accepted = inspect.signature(model.forward).parameters
            if "token_type_ids" in enc and "token_type_ids" in accepted:
                kwargs["token_type_ids"] = enc["token_type_ids"]
            if "use_cache" in accepted:
                kwargs["use_cache"] = False
            if isinstance(model, tf.T5ForConditionalGeneration):
                labels = tok(text_target=[target], return_tensors="pt")["input_ids"]
                kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            model(**kwargs)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize(("family", "cls"), CASES, ids=CASE_IDS)
def test_padded_batched_statistics_equal_unpadded_per_module_grams(tmp_path, family, cls):
    model = build_model(family, cls, seed=1)
    path = save_model(model, tmp_path / "m")
    stats = measure(
        path, EXAMPLES, batch_size=4, stats_dtype="float64", model_dtype="float64", progress=False, protection=ALL_SITES
    )
    model = model.double()
    oracle = oracle_grams(path, model, list(stats.modules))
    for module, site in stats.modules.items():
        torch.testing.assert_close(stats.sites[site].gram, oracle[module], rtol=1e-9, atol=1e-9, msg=module)
    # every nn.Linear / Conv1D is measured or skipped with a reason; nothing silently dropped
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | tf.pytorch_utils.Conv1D)}
    assert linear == set(stats.modules) | set(stats.skipped)


def test_grams_accumulated_by_upper_blocks_equal_the_full_product(tmp_path, monkeypatch):
    """Wide Grams are accumulated on and above the block diagonal only and mirrored at the end."""
    M = importlib.import_module("regmean.measure.accumulate")
    monkeypatch.setattr(M, "GRAM_BLOCK", 5)  # every tiny-model site (width >= 10) split into blocks
    assert len(M.gram_blocks(37)) > 3
    model = build_model("llama", "LlamaForCausalLM", seed=2)
    path = save_model(model, tmp_path / "m")
    stats = measure(
        path, EXAMPLES, batch_size=4, stats_dtype="float64", model_dtype="float64", progress=False, protection=ALL_SITES
    )
    oracle = oracle_grams(path, model.double(), list(stats.modules))
    for module, site in stats.modules.items():
        gram = stats.sites[site].gram
        assert len(M.gram_blocks(gram.shape[0])) > 2, module
        torch.testing.assert_close(gram, oracle[module], rtol=1e-9, atol=1e-9, msg=module)


def test_sites_are_shared_by_modules_reading_one_tensor(tmp_path):
    path = save_model(build_model("t5", "T5ForSequenceClassification", 1), tmp_path / "m")
    stats = measure(path, EXAMPLES, batch_size=4, progress=False, protection=ALL_SITES)
    m = stats.modules
    enc = "transformer.encoder.block.0.layer.0.SelfAttention."
    assert m[enc + "q"] == m[enc + "k"] == m[enc + "v"] != m[enc + "o"]
    cross = [n for n in m if "EncDecAttention.k" in n or "EncDecAttention.v" in n]
    assert len(cross) == 4 and len({m[n] for n in cross}) == 1  # every layer's k/v read the encoder output
    assert m["transformer.decoder.block.0.layer.1.EncDecAttention.q"] != m[cross[0]]
    # counts: encoder and decoder streams both count the real tokens, the pooled head one row per example
    tokens = stats.tokens
    assert stats.sites[m[enc + "q"]].count == tokens
    assert stats.sites[m[cross[0]]].count == tokens  # each module's own Gram: every encoder token once
    assert stats.sites[m["transformer.decoder.block.0.layer.0.SelfAttention.q"]].count == tokens
    assert stats.sites[m["transformer.decoder.block.0.layer.1.EncDecAttention.q"]].count == tokens
    assert stats.sites[m["classification_head.out_proj"]].count == len(EXAMPLES)


def test_sums_and_counts(tmp_path):
    model = build_model("bert", "BertForSequenceClassification", 1)
    path = save_model(model, tmp_path / "m")
    stats = measure(
        path, EXAMPLES, batch_size=3, stats_dtype="float64", model_dtype="float64", progress=False, protection=ALL_SITES
    )
    tok = tf.AutoTokenizer.from_pretrained(path)
    assert stats.tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    site = stats.sites[stats.modules["bert.encoder.layer.0.attention.self.query"]]
    assert site.count == stats.tokens
    # the sum of x is a row of the affine Gram: check against the oracle's mean through the embeddings output
    with torch.no_grad():
        total = sum(model.double().bert.embeddings(tok([t], return_tensors="pt")["input_ids"])[0].sum(0) for t in TEXTS)
    torch.testing.assert_close(site.sum, total, rtol=1e-9, atol=1e-9)


def test_combined_halves_equal_the_whole(tmp_path):
    path = save_model(build_model("llama", "LlamaForCausalLM", 1), tmp_path / "m")
    kw = {"batch_size": 4, "stats_dtype": "float64", "progress": False, "protection": ALL_SITES}
    whole = measure(path, EXAMPLES, **kw)
    save(measure(path, EXAMPLES[:4], **kw), tmp_path / "a")
    save(measure(path, EXAMPLES[4:], **kw), tmp_path / "b")
    both = combine([tmp_path / "a", tmp_path / "b"])
    assert both.examples == whole.examples and both.tokens == whole.tokens
    for name, s in whole.sites.items():
        assert both.sites[name].count == s.count
        torch.testing.assert_close(both.sites[name].gram, s.gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(both.sites[name].sum, s.sum, rtol=1e-12, atol=1e-12)


def test_a_shard_is_never_combined_twice(tmp_path):
    """Sweep 6 R8: a shard combined with a combination that holds it was added twice (15 examples of 10); each
    record of a combination keeps its part's digest, and combinations of combinations check them all."""
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    kw = {"batch_size": 4, "progress": False, "protection": ALL_SITES}
    for name, part in (("a", EXAMPLES[:3]), ("b", EXAMPLES[3:6]), ("c", EXAMPLES[6:])):
        save(measure(path, part, **kw), tmp_path / name)
    save(combine([tmp_path / "a", tmp_path / "b"]), tmp_path / "ab")
    for again in (["a", "ab"], ["ab", "b"], ["ab", "ab"]):
        with pytest.raises(RegmeanError, match="each data shard may be added only once"):
            combine([tmp_path / n for n in again])
    whole = combine([tmp_path / "ab", tmp_path / "c"])  # disjoint: fine, and its records know all three parts
    assert whole.examples == len(EXAMPLES) and len({r["part"] for r in whole.provenance}) == 3
    save(whole, tmp_path / "abc")
    with pytest.raises(RegmeanError, match="already in"):
        combine([tmp_path / "abc", tmp_path / "b"])


def test_format_2_stores_half_of_each_gram_and_format_1_still_reads(tmp_path):
    """Format 2 keeps each Gram's upper triangle (read back bit for bit); a format-1 file (whole Grams) written
    here by hand reads the same, `stats show` names each layout, and `stats combine` of a format-1 file writes
    format 2."""
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    stats = measure(path, EXAMPLES, batch_size=4, progress=False, protection=ALL_SITES)
    new = save(stats, tmp_path / "v2")
    stored = load_file(new)
    whole = {}
    for name, site in stats.sites.items():
        d = site.gram.shape[0]
        packed = stored[f"{name}::gram_upper"]
        rows, cols = torch.triu_indices(d, d)
        assert torch.equal(packed, site.gram[rows, cols])  # the upper triangle, row by row
        whole.update({f"{name}::gram": site.gram, f"{name}::sum": site.sum, f"{name}::count": stored[f"{name}::count"]})
    old = tmp_path / "v1" / "statistics.safetensors"
    old.parent.mkdir()
    save_file(whole, old, metadata={**stats.metadata(), "format_version": "1"})
    v1, v2 = StatisticsFile(tmp_path / "v1"), StatisticsFile(tmp_path / "v2")
    for name, site in stats.sites.items():
        d = site.gram.shape[0]
        assert (v1.gram_nbytes(name), v2.gram_nbytes(name)) == (4 * d * d, 4 * d * (d + 1) // 2)
    grams = sum(4 * (s.gram.shape[0] ** 2 - s.gram.shape[0] * (s.gram.shape[0] + 1) // 2) for s in stats.sites.values())
    assert v1.nbytes - v2.nbytes >= grams - 200  # the files differ by the lower triangles (and key names)
    for f in (StatisticsFile(tmp_path / "v1"), StatisticsFile(tmp_path / "v2")):
        for name, site in stats.sites.items():
            assert torch.equal(f.site(name).gram, site.gram) and torch.equal(f.site(name).sum, site.sum)
    for folder, layout in (("v1", "whole"), ("v2", "upper triangle")):
        shown = CliRunner().invoke(app, ["stats", "show", str(tmp_path / folder)], env={"COLUMNS": "200"}).output
        assert f"in 1 file(s), Grams stored {layout}" in shown
    combined = save(combine([tmp_path / "v1"]), tmp_path / "c")
    assert StatisticsFile(combined).gram_layout == "upper triangle"


def test_unpacking_mirrors_every_row_block_exactly():
    """Widths across several PACK_ROWS blocks (and not a multiple of it) unpack to the matrix that was packed."""
    for d in (1, PACK_ROWS, 2 * PACK_ROWS + 37):
        x = torch.randn(3 * d, d, dtype=torch.float64)
        gram = x.T @ x
        gram = (gram + gram.T) / 2  # exactly symmetric
        packed = pack_upper(gram)
        assert packed.shape == (d * (d + 1) // 2,)
        assert torch.equal(unpack_upper(packed, d), gram)


def test_file_round_trip_keeps_everything(tmp_path):
    path = save_model(build_model("gpt2", "GPT2LMHeadModel", 1), tmp_path / "m")
    stats = measure(
        path,
        EXAMPLES,
        batch_size=4,
        include=r"\.h\.0\.",
        provenance={"data": "x.jsonl"},
        progress=False,
        protection=ALL_SITES,
    )
    assert set(stats.modules) == {
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    file = StatisticsFile(save(stats, tmp_path / "s"))
    assert file.modules == stats.modules and file.fingerprint == stats.fingerprint
    assert file.provenance[0]["data"] == "x.jsonl" and file.examples == len(EXAMPLES)
    assert "not matched by include" in file.skipped["transformer.h.1.attn.c_attn"]
    for name, s in stats.sites.items():
        assert torch.equal(file.site(name).gram, s.gram) and file.site(name).count == s.count


def test_measuring_in_blocks_equals_one_pass_and_merges(tmp_path):
    from conftest import write_jsonl

    path = save_model(build_model("llama", "LlamaForCausalLM", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    runner = CliRunner()
    common = ["measure", str(path), "--data", str(data), "--stats-dtype", "float64", "--model-dtype", "float64"]
    assert runner.invoke(app, [*common, "--out", str(tmp_path / "one")]).exit_code == 0
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "blocks"), "--max-memory", "5KB"])
    assert result.exit_code == 0, result.output
    one, blocks = StatisticsFile(tmp_path / "one"), StatisticsFile(tmp_path / "blocks")
    files = sorted((tmp_path / "blocks").glob("statistics-*-of-*.safetensors"))
    assert 1 < len(files) < len(one.site_names)  # float64 sums of 16 and 24 wide sites: one or two per 5KB block
    assert (blocks.examples, blocks.tokens, blocks.modules) == (one.examples, one.tokens, one.modules)
    for site in one.site_names:
        a, b = one.site(site), blocks.site(site)
        assert a.count == b.count and torch.allclose(a.gram, b.gram, rtol=1e-12, atol=1e-12)
    import regmean

    # merging from the blocks is merging from the one file; other = the model perturbed, measured the same way
    other = build_model("llama", "LlamaForCausalLM", 2)
    other_path = save_model(other, tmp_path / "m2")
    assert runner.invoke(app, ["measure", str(other_path), *common[2:], "--out", str(tmp_path / "o2")]).exit_code == 0
    merged = {}
    for name in ("one", "blocks"):
        models = [
            {"path": str(path), "statistics": str(tmp_path / name)},
            {"path": str(other_path), "statistics": str(tmp_path / "o2")},
        ]
        regmean.merge(regmean.MergeConfig(models=models), tmp_path / f"merged-{name}", progress=False)
        merged[name] = load_file(tmp_path / f"merged-{name}" / "model.safetensors")
    assert merged["one"].keys() == merged["blocks"].keys()
    assert all(torch.equal(merged["blocks"][key], tensor) for key, tensor in merged["one"].items())
    assert not torch.equal(
        merged["one"]["model.layers.0.mlp.up_proj.weight"],
        load_file(path / "model.safetensors")["model.layers.0.mlp.up_proj.weight"],
    )
    files[1].unlink()
    with pytest.raises(regmean.RegmeanError, match="the measure did not finish"):
        StatisticsFile(tmp_path / "blocks")


def test_forward_stops_after_the_last_measured_input(tmp_path, monkeypatch):
    """Layers after the last measured input never run; statistics stay those of the full forward (tests above)."""
    M = importlib.import_module("regmean.measure.pipeline")
    path = save_model(build_model("llama", "LlamaForCausalLM", seed=1), tmp_path / "m")
    ran: dict[str, int] = {"lm_head": 0, "last_mlp": 0}
    load = M.load_adapted

    def load_watched(*args, **kwargs):
        model = load(*args, **kwargs)
        model.lm_head.register_forward_hook(lambda *_: ran.__setitem__("lm_head", ran["lm_head"] + 1))
        mlp = model.model.layers[-1].mlp
        mlp.register_forward_hook(lambda *_: ran.__setitem__("last_mlp", ran["last_mlp"] + 1))
        return model

    monkeypatch.setattr(M, "load_adapted", load_watched)
    stats = measure(path, EXAMPLES, batch_size=4, exclude="lm_head", progress=False, protection=ALL_SITES)
    assert "lm_head" in stats.skipped
    assert ran == {"lm_head": 1, "last_mlp": 1}  # only the site-detection pass runs to the end
    assert stats.sites[stats.modules["model.layers.1.mlp.down_proj"]].count == stats.tokens


def test_the_same_measure_writes_the_same_bytes(tmp_path):
    """Sweep 5 F11: metadata keys came out in the safetensors library's hash order, so two runs differed in bytes."""
    from conftest import write_jsonl

    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    runner = CliRunner()
    for k in range(2):
        result = runner.invoke(app, ["measure", str(path), "--data", str(data), "--out", str(tmp_path / f"s{k}")])
        assert result.exit_code == 0, result.output
    first, second = ((tmp_path / f"s{k}" / "statistics.safetensors").read_bytes() for k in range(2))
    assert first == second
    assert StatisticsFile(tmp_path / "s0").examples == len(TEXTS)


def test_combine_warns_of_the_same_data_measured_twice_and_names_a_protection_mismatch(tmp_path):
    """Sweep 7 C09: the same data measured twice with other options (other bytes) combined silently, counted twice;
    now one warning. C12: a withheld part and an exposed one were told to check include/exclude."""
    from regmean.errors import RegmeanWarning
    from regmean.measure.protect import Protection

    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    for name, batch, data in (("a", 4, "d1.jsonl"), ("b", 1, "copy-of-d1.jsonl")):  # sweep 8 F07: renamed
        record = {"data": data}
        save(measure(path, EXAMPLES[:3], batch_size=batch, progress=False, provenance=record), tmp_path / name)
    with pytest.warns(RegmeanWarning, match=r"\(data 'copy-of-d1.jsonl'\) and .* both record 3 examples and"):
        assert combine([tmp_path / "a", tmp_path / "b"]).examples == 6
    exposed = measure(path, EXAMPLES[3:6], progress=False, protection=Protection(withhold=False))
    save(exposed, tmp_path / "c")
    with pytest.raises(RegmeanError, match=r"withheld the token sites .* \(--expose-token-counts\)"):
        combine([tmp_path / "a", tmp_path / "c"])
