"""A statistics file's numbers are checked against what sums of outer products satisfy before any is solved: forged
or corrupted files are refused in one line naming the file (exit 2, nothing written), real ones always pass."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ALL_SITES, TARGETS, TEXTS, build_model, save_model
from test_bad_input import merge_fails
from test_hostile_input import rewrite
from test_merge import make_models, run, write_config
from transformers import AutoTokenizer

from regmean.combine import combine
from regmean.errors import RegmeanError
from regmean.io.data import Example
from regmean.measure import measure
from regmean.measure.protect import Protection
from regmean.methods.least_squares import is_semidefinite
from regmean.stats import StatisticsFile, pack_upper, save, unpack_upper
from regmean.stats_checks import scale_outlier

SITE = "bert.encoder.layer.1.attention.self.query"


@pytest.fixture
def trio(tmp_path):
    return tmp_path, make_models(tmp_path / "in", "bert", "BertForSequenceClassification")


def forge(folder: str | Path, change=None, meta_change=None) -> Path:
    """Rewrite a statistics file with `change(tensors)` and `meta_change(metadata)` applied."""
    path = Path(folder) / "statistics.safetensors"
    rewrite(path, metadata_change=meta_change, tensor_change=change)
    return path


def edit_gram(tensors: dict, edit) -> None:
    """Apply `edit` to SITE's whole Gram and store it back packed."""
    packed = tensors[f"{SITE}::gram_upper"]
    d = tensors[f"{SITE}::sum"].shape[0]
    gram = unpack_upper(packed, d)
    edit(gram)
    tensors[f"{SITE}::gram_upper"] = pack_upper(gram)


def set_count(value: int):
    return lambda t: t.__setitem__(f"{SITE}::count", torch.tensor([value], dtype=torch.int64))


def both_layouts(tensors: dict) -> None:
    d = tensors[f"{SITE}::sum"].shape[0]
    tensors[f"{SITE}::gram"] = unpack_upper(tensors[f"{SITE}::gram_upper"], d) * 2  # disagrees


def negative_diagonal(tensors: dict) -> None:
    edit_gram(tensors, lambda g: g.__setitem__((3, 3), -1.0))


def off_diagonal_too_large(tensors: dict) -> None:
    def edit(g):
        big = 2 * float((g[0, 0] * g[1, 1]).sqrt()) + 1.0
        g[0, 1] = g[1, 0] = big

    edit_gram(tensors, edit)


def sum_too_large(tensors: dict) -> None:
    total = tensors[f"{SITE}::sum"]
    count = int(tensors[f"{SITE}::count"][0])
    gram_diag = unpack_upper(tensors[f"{SITE}::gram_upper"], total.shape[0]).diagonal()
    total[2] = 2 * float((count * gram_diag[2]).sqrt()) + 1.0


CASES = {
    "two layouts": (both_layouts, "holds its Gram twice"),
    "negative diagonal": (negative_diagonal, "negative sum of squares"),
    "off-diagonal": (off_diagonal_too_large, "exceeds what its diagonal allows"),
    "sum": (sum_too_large, "larger than"),
    "count 2^62": (set_count(2**62), "provenance gives"),
    "count off by one": (None, "provenance gives"),
    "negative count": (set_count(-5), "negative row count"),
}


@pytest.mark.parametrize("case", CASES)
def test_forged_statistics_are_refused_before_any_solve(trio, case):
    tmp_path, models = trio
    change, says = CASES[case]
    if change is None:
        count = StatisticsFile(models[1]["statistics"]).count(SITE)
        change = set_count(count + 1)
    path = forge(models[1]["statistics"], change)
    with pytest.raises(RegmeanError, match=f"{path}.*{says}"):
        StatisticsFile(path).site(SITE)
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), says)
    if case != "two layouts":  # combine reads every site too
        other = save(
            measure(models[1]["path"], [Example(TEXTS[-1])], progress=False, protection=ALL_SITES), tmp_path / "other"
        )
        with pytest.raises(RegmeanError, match=says):
            combine([other, path])


def test_files_that_do_not_record_streams_are_bounded_by_their_provenance(trio):
    """Older files (no site_streams): a count above examples x max length x 64 calls is refused, a plausible one
    is not."""
    tmp_path, models = trio

    def drop_streams(meta):
        del meta["site_streams"]

    path = forge(models[0]["statistics"], meta_change=drop_streams)
    StatisticsFile(path).site(SITE)  # the true count passes
    forge(path.parent, set_count(2**62))
    with pytest.raises(RegmeanError, match="examples x max"):
        StatisticsFile(path).site(SITE)


def test_an_indefinite_gram_that_breaks_the_solve_is_named(trio):
    """2 x 2 minors hold (|G_ij| = 0.9 sqrt(G_ii G_jj)) but the Gram is far from PSD: the solve fails even with
    its largest ridge, and the file is named."""
    tmp_path, models = trio

    def indefinite(g):
        d = g.shape[0]
        scale = 1e3 * float(g.diagonal().mean())
        g.copy_(scale * (1.9 * torch.eye(d) - 0.9 * torch.ones(d, d)))

    path = forge(models[2]["statistics"], lambda t: edit_gram(t, indefinite))
    StatisticsFile(path).site(SITE)  # passes the cheap identities
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), "not positive semidefinite")


def indefinite_block(g: torch.Tensor) -> None:
    """Three entries at 0.9 sqrt(G_ii G_jj): every 2 x 2 minor holds, the 3 x 3 block's correlations
    [[1, .9, .9], [.9, 1, -.9], [.9, -.9, 1]] have the eigenvalue -0.8."""
    root = g.diagonal().sqrt()
    for i, j, sign in ((0, 1, 1), (0, 2, 1), (1, 2, -1)):
        g[i, j] = g[j, i] = sign * 0.9 * root[i] * root[j]


def test_an_indefinite_gram_that_a_solve_would_accept_is_refused_before_use(trio):
    """Sweep finding F1: at alpha 0.9 the summed system stays positive definite, so only the Cholesky proof of
    each Gram catches it; with verify_grams off (the option's stated trade) the same files merge."""
    tmp_path, models = trio
    path = forge(models[1]["statistics"], lambda t: edit_gram(t, indefinite_block))
    StatisticsFile(path).site(SITE)  # passes the cheap identities
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), SITE, "not positive semidefinite")
    config = write_config(tmp_path, method="regmean", models=models, options={"verify_grams": False})
    assert run("merge", str(config), str(tmp_path / "unverified")).exit_code == 0


def test_the_semidefinite_proof_against_eigenvalues():
    """Oracle: eigvalsh. Float32-rounded Grams of rank-deficient data, with wildly different feature scales, pass;
    one eigenvalue of -1e-2 (in units of the diagonal) fails; the matrix is restored bit for bit either way."""
    generator = torch.Generator().manual_seed(0)
    for d, n in ((8, 3), (64, 40), (300, 1000)):
        x = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.logspace(-3, 4, d, dtype=torch.float64)
        gram = (x.T @ x).float().double()  # stored in float32, as measure does by default
        before = gram.clone()
        assert is_semidefinite(gram) and torch.equal(gram, before)
        root = gram.diagonal().sqrt()
        correlation = gram / root[:, None] / root[None, :]
        values, vectors = torch.linalg.eigh(correlation)
        values[0] = -1e-2
        forged = (vectors * values) @ vectors.T * root[:, None] * root[None, :]
        assert float(torch.linalg.eigvalsh(forged)[0]) < 0
        kept = forged.clone()
        assert not is_semidefinite(forged) and torch.equal(forged, kept)


OUTPUT = "bert.encoder.layer.1.attention.output.dense"
KEY = "bert.encoder.layer.1.attention.self.key"


def swap_sites(meta: dict) -> None:
    """The attention's q/k/v said to read the output projection's input and the other way round (same width)."""
    modules = json.loads(meta["modules"])
    for module, site in modules.items():
        modules[module] = {SITE: OUTPUT, OUTPUT: SITE}.get(site, site)
    meta["modules"] = json.dumps(modules)


def key_apart(tensors: dict) -> None:
    """A site of its own for the key projection: the query site's statistics copied under its name."""
    for part in ("gram_upper", "sum", "count"):
        tensors[f"{KEY}::{part}"] = tensors[f"{SITE}::{part}"].clone()


def key_apart_meta(meta: dict) -> None:
    modules = json.loads(meta["modules"])
    modules[KEY] = KEY
    meta["modules"] = json.dumps(modules)
    streams = json.loads(meta["site_streams"])
    streams[KEY] = streams[SITE]
    meta["site_streams"] = json.dumps(streams)


def twice_the_calls(tensors: dict) -> None:
    tensors[f"{SITE}::count"] = tensors[f"{SITE}::count"] * 2


def twice_the_calls_meta(meta: dict) -> None:
    streams = json.loads(meta["site_streams"])
    streams[SITE][1] *= 2
    meta["site_streams"] = json.dumps(streams)


def test_a_swapped_module_map_is_refused(trio):
    """Sweep finding F3: each site is named after the first module that reads it, so a swapped map names sites
    after modules that do not read them."""
    tmp_path, models = trio
    path = forge(models[1]["statistics"], meta_change=swap_sites)
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), "is read first by module")


@pytest.mark.parametrize(
    ("tensors", "meta", "says"),
    [(key_apart, key_apart_meta, f"module {KEY} reads site {KEY}"), (twice_the_calls, twice_the_calls_meta, "calls")],
    ids=["regrouped", "calls"],
)
def test_a_header_forged_consistently_within_its_file_differs_from_the_others(trio, tensors, meta, says):
    """Sweep finding F2: a file whose site map or calls per pass (and counts to match) were edited consistently
    passes every check of its own, but one architecture has one structure: the other files' says otherwise."""
    tmp_path, models = trio
    path = forge(models[2]["statistics"], tensors, meta)
    StatisticsFile(path).site(SITE)  # consistent within itself
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), says)
    with pytest.raises(RegmeanError, match=says):
        combine([models[0]["statistics"], path])


def scaled(tensors: dict) -> None:
    """Every site's data as if multiplied by 300: Grams x 9e4, sums x 300, counts kept (sweep findings S29 at 1e10,
    F5 at 300)."""
    for key in list(tensors):
        if key.endswith(("::gram_upper", "::gram")):
            tensors[key] = tensors[key] * 9e4
        elif key.endswith("::sum"):
            tensors[key] = tensors[key] * 300


def test_statistics_scaled_by_a_constant_are_refused(trio):
    """Every identity holds for data x 300, but that owner's weights would become the merge: the site's mean
    squared input norm against the other models' names the file. Real fine-tunes differ by at most 12x."""
    tmp_path, models = trio
    path = forge(models[1]["statistics"], scaled)
    StatisticsFile(path).site(SITE)  # consistent within itself
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), "mean squared norm", "altered")
    assert scale_outlier([1.0, 12.0]) is None and scale_outlier([1.0, 2.0, 5e3]) == (2, 2.0)
    assert scale_outlier([1.0, 900.0, 2.0]) is None and scale_outlier([2e-4, 1.0, 2.0]) == (0, 1.0)
    assert scale_outlier([1.0, 2e3]) == (1, 1.0) and scale_outlier([0.0, 5.0]) is None


def provenance_edit(change):
    def edit(meta):
        records = json.loads(meta["provenance"])
        change(meta, records[0])
        meta["provenance"] = json.dumps(records)

    return edit


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda meta, record: meta.__setitem__("examples", "0"), "are not its provenance's"),
        (lambda meta, record: meta.__setitem__("tokens", "999"), "are not its provenance's"),
        (lambda meta, record: record.__setitem__("max_length", 1), "examples of at most 1"),
        (lambda meta, record: record.__setitem__("processes", 0), "records 0 processes"),
        (lambda meta, record: record.__setitem__("tokens", str(record["tokens"])), "tokens is '.*', not a count"),
        (lambda meta, record: record.__setitem__("tokens", 2), "records 2 tokens from 4 examples"),
    ],
    ids=["examples", "tokens", "max_length", "processes", "typed", "fewer_tokens"],
)
def test_a_header_whose_counts_contradict_its_provenance_is_refused(trio, change, says):
    """Sweep findings S05/S15/S26/S27: such numbers went into `stats show` and the merged card."""
    tmp_path, models = trio
    path = forge(models[0]["statistics"], meta_change=provenance_edit(change))
    with pytest.raises(RegmeanError, match=says):
        StatisticsFile(path)


def test_counts_are_calls_times_stream_rows_counted_plainly(tmp_path):
    """The recorded counts are what a plain count of the tokenizer's output gives: encoder sites count input
    tokens, decoder sites decoder tokens, per-example sites examples; so the exact check passes real files."""
    path = save_model(build_model("t5", "T5ForConditionalGeneration", 1), tmp_path / "t5")
    examples = [Example(t, None, y) for t, y in zip(TEXTS[:5], TARGETS[:5], strict=True)]
    stats = save(
        measure(path, examples, batch_size=2, max_length=16, progress=False, protection=ALL_SITES), tmp_path / "s"
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = sum(len(tokenizer(t, truncation=True, max_length=16)["input_ids"]) for t in TEXTS[:5])
    targets = sum(len(tokenizer(text_target=y, truncation=True, max_length=16)["input_ids"]) for y in TARGETS[:5])
    f = StatisticsFile(stats)
    assert f.provenance[0]["tokens"] == tokens and f.provenance[0]["decoder_tokens"] == targets
    streams = {stream for stream, _ in f.site_streams.values()}
    assert {"input", "decoder"} <= streams
    for name, (stream, calls) in f.site_streams.items():
        rows = {"input": tokens, "decoder": targets, "example": 5}[stream]
        assert f.count(name) == calls * rows, name
        f.site(name)
    meta = json.loads(f.meta["site_streams"])
    assert set(meta) == set(f.site_names)


def test_combined_files_keep_exact_counts(tmp_path):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    parts = [
        save(measure(path, [Example(t) for t in texts], progress=False, protection=ALL_SITES), tmp_path / f"p{i}")
        for i, texts in enumerate((TEXTS[:3], TEXTS[3:7]))
    ]
    f = StatisticsFile(save(combine(parts), tmp_path / "all"))
    assert f.count(SITE) == sum(StatisticsFile(p).count(SITE) for p in parts)
    assert f.count(SITE) == sum(r["tokens"] for r in f.provenance)
    for name in f.site_names:
        f.site(name)


@pytest.mark.parametrize(
    ("field", "edit", "says"),
    [
        ("site_streams", lambda v: {**v, SITE: ["bogus", 1]}, "no known kind"),
        ("site_streams", lambda v: {**v, "nowhere": ["input", 1]}, "has no statistics for"),
        ("privacy", lambda v: {**v, "withheld": [SITE]}, "said to be withheld"),
        ("provenance", lambda v: [{**v[0], "max_length": 2**55}], "max length outside"),
    ],
)
def test_a_header_that_contradicts_itself_is_refused(tmp_path, field, edit, says):
    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    save(measure(path, [Example(t) for t in TEXTS[:3]], progress=False, protection=ALL_SITES), tmp_path / "s")

    def change(meta):
        meta[field] = json.dumps(edit(json.loads(meta[field])))

    forged = forge(tmp_path / "s", meta_change=change)
    with pytest.raises(RegmeanError, match=f"{forged}: .*{says}"):
        StatisticsFile(forged)


def dp_claim(meta: dict) -> None:
    meta["privacy"] = json.dumps({**json.loads(meta.get("privacy", "{}")), "dp": {}})


def test_a_dp_claim_switches_no_check_off(trio):
    """Sweep 4 F1: a bare `dp` record without its mechanism's numbers is refused; an honest DP file beside the
    others leaves their scale check on (the DP file itself is not compared: its trace and count are noisy)."""
    tmp_path, models = trio
    claimed = forge(models[1]["statistics"], scaled, dp_claim)
    with pytest.raises(RegmeanError, match="privacy"):
        StatisticsFile(claimed)
    rewrite(claimed, metadata_change=lambda m: m.__setitem__("privacy", json.dumps({"withheld": []})))
    texts = [Example(t) for t in TEXTS * 20]
    dp = save(measure(models[2]["path"], texts, progress=False, protection=Protection(epsilon=8)), tmp_path / "dp")
    models[2] = {**models[2], "statistics": str(dp.parent)}
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(claimed), "mean squared norm")


def test_the_odd_file_is_named_wherever_it_stands(trio):
    """Sweep 4 F5: forged first in the recipe, the file was named only as the reference, the honest ones as altered.
    The reference is the structure most files share."""
    tmp_path, models = trio
    path = forge(models[0]["statistics"], twice_the_calls, twice_the_calls_meta)
    errors = merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), "calls")
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}:"), errors


def test_files_without_streams_merge_and_say_their_counts_are_only_bounded(trio):
    """Sweep 4 F3: when every file predates site streams, the counts are only bounded: the plan and the card say so."""
    tmp_path, models = trio
    for m in models:
        forge(m["statistics"], meta_change=lambda meta: meta.pop("site_streams"))
    result = run("merge", write_config(tmp_path, method="regmean", models=models), tmp_path / "out")
    assert result.exit_code == 0, result.output
    said = "row counts only bounded, not checked exactly, in 3 file(s)"
    assert said in " ".join(result.output.split()) and said in (tmp_path / "out" / "README.md").read_text()


def test_a_model_that_carries_the_merge_is_said(trio):
    """Sweep 4 F4: inputs x20 (Grams x400) stay within the models' scale spread, and that owner decides the merge:
    said in the console, merge_report.json and the card. Honest files say nothing of the kind."""
    tmp_path, models = trio
    honest = run("merge", write_config(tmp_path, method="regmean", models=models), tmp_path / "honest")
    assert honest.exit_code == 0 and "carries a median" not in honest.output, honest.output

    def times_20(tensors):
        for key in list(tensors):
            if key.endswith("::gram_upper"):
                tensors[key] = tensors[key] * 400
            elif key.endswith("::sum"):
                tensors[key] = tensors[key] * 20

    forge(models[1]["statistics"], times_20)
    result = run("merge", write_config(tmp_path, method="regmean", models=models), tmp_path / "out")
    assert result.exit_code == 0, result.output
    said = f"warning: {models[1]['path']} carries a median"
    assert said in " ".join(result.output.split())
    assert said in (tmp_path / "out" / "README.md").read_text()
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert len(report["warnings"]) == 1 and all(abs(sum(row["gram_share"]) - 1) < 1e-9 for row in report["layers"])


def test_a_block_copied_over_another_is_named(tmp_path):
    """Sweep 5 F12b: block 3 overwritten by block 2 read as 'no statistics for site ...' (the copy's sites were
    taken from the first block holding them): now the copy is named, with the block it repeats."""
    import shutil

    from conftest import write_jsonl

    path = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    result = run("measure", path, "--data", data, "--out", tmp_path / "s", "--max-memory", "4KB")
    assert result.exit_code == 0, result.output
    blocks = sorted((tmp_path / "s").glob("statistics-*-of-*.safetensors"))
    assert len(blocks) >= 3
    shutil.copyfile(blocks[1], blocks[2])
    with pytest.raises(RegmeanError, match=f"{blocks[2].name}: site .* is stored in {blocks[1].name} too"):
        StatisticsFile(tmp_path / "s")


def test_a_site_whose_inputs_are_all_zero_merges_with_defined_diagnostics(tmp_path):
    """Sweep 7 G12: one model's site with all-zero inputs (a dead layer) passes every check, as it should, but its
    relative error 0/0 made the summary, the card and merge_report.json say NaN (bare NaN is not JSON); the
    undefined error is left out (null in the report)."""
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification")
    stats = Path(models[1]["statistics"]) / "statistics.safetensors"

    def zero(tensors):
        tensors[f"{SITE}::gram_upper"].zero_()
        tensors[f"{SITE}::sum"].zero_()

    rewrite(stats, tensor_change=zero)
    result = run("merge", write_config(tmp_path, method="regmean", models=models), tmp_path / "out")
    assert result.exit_code == 0 and not re.search(r"\bnan\b", result.output.lower()), result.output
    text = (tmp_path / "out" / "merge_report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in merge_report.json"))
    row = next(r for r in report["layers"] if r["site"] == SITE)
    assert row["relative_error"][1] is None and all(e is not None for e in row["relative_error"][::2])
    assert not re.search(r"\bnan\b", (tmp_path / "out" / "README.md").read_text().lower())
