"""Every merged tensor of every method and option, on the tiny models of every family, bit for bit as recorded.

The digests in data/merge_digests.json were recorded before the merge engine was restructured, so any change in
what a merge computes (not only a wrong answer: a reordered sum, a different dtype) shows here. RegMean's were
recorded again when its solve moved to float64 products in deviation form (closer to the exact optimum); every
other method's digests were the same before and after that change. They depend on the machine's arithmetic
(torch and transformers versions, CPU kernels, thread count); on another machine the test is skipped with that
reason, and `REGMEAN_RECORD_DIGESTS=1` records that machine's own. (Twice a fresh install of the same versions did
not reproduce RegMean's digests while every other method's held: the Grams' forward passes rounded differently. The
Grams are now seeded synthetic sums over the measured sites, and RegMean's digests were recorded again.)

On any machine, recorded digests or not, every merge of the default options (and weighted averages) is also checked
against a plain merge written here from the input files: each average, task-arithmetic and Fisher-weighted tensor
against its formula in float64, each RegMean layer against the normal equations from the statistics files, every
other tensor against the plain average (`plain_merge_problems`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import ALL_SITES, CASES, TARGETS, TEXTS, _config, build_model, save_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from regmean.architecture import meta_model
from regmean.io.data import Example
from regmean.measure import measure
from regmean.measure.fisher import save_fisher
from regmean.merge import MergeConfig, merge
from regmean.stats import StatisticsFile, save

DIGESTS = Path(__file__).parent / "data" / "merge_digests.json"
EXAMPLES = [Example(t, None, y) for t, y in zip(TEXTS, TARGETS, strict=True)]
K = 3

# options tried on every family, and more on a few families whose layers exercise them
EVERY = {
    "regmean": {"method": "regmean"},
    "average": {"method": "average"},
    "task_arithmetic": {"method": "task_arithmetic", "options": {"scaling": 0.7}, "base": True},
    "fisher": {"method": "fisher"},
}
SOME = {
    "regmean_sum_alpha1": {"method": "regmean", "options": {"alpha": 1.0, "gram_weighting": "sum"}},
    "regmean_joint_alpha0": {"method": "regmean", "options": {"alpha": 0.0, "bias": "joint"}},
    "regmean_joint_weights": {"method": "regmean", "options": {"bias": "joint"}, "weights": [1.0, 2.0, 5.0]},
    "regmean_bfloat16": {"method": "regmean", "dtype": "bfloat16"},
    "average_weights": {"method": "average", "weights": [3.0, 1.0, 1.0]},
    "regmean_embeddings_base": {"method": "regmean", "embeddings": "base", "base": True},
}
SOME_CASES = ("BertForSequenceClassification", "T5ForConditionalGeneration", "GPT2LMHeadModel", "LlamaUntied")
KEEP_CASES = ("BertForTokenClassification", "LlamaForSequenceClassification", "T5ForSequenceClassification")
UNTIED = {
    "regmean_lm_head": {"method": "regmean", "lm_head": "regmean"},
    "regmean_lm_head_base": {"method": "regmean", "lm_head": "base", "embeddings": "base", "base": True},
}


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": tf.__version__,  # its forward passes make the Grams: a new release may round differently
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def variants() -> list[tuple[str, str, str, dict]]:
    """(case, family, class, variant name, recipe) for every recorded merge."""
    cases = [(c[1], *c) for c in CASES] + [("LlamaUntied", "llama", "LlamaForCausalLM")]
    out = []
    for case, family, cls in cases:
        chosen = dict(EVERY)
        if case in SOME_CASES:
            chosen |= SOME
        if case in KEEP_CASES:
            chosen |= {"regmean_keep": {"method": "regmean", "heads": "keep"}}
            chosen |= {"average_keep": {"method": "average", "heads": "keep"}}
        if case == "LlamaUntied":
            chosen |= UNTIED
        out += [(case, family, cls, name, recipe) for name, recipe in chosen.items()]
    return out


def build(case: str, family: str, cls: str, seed: int):
    if case != "LlamaUntied":
        return build_model(family, cls, seed=seed)
    config = _config("llama")
    config.tie_word_embeddings = False
    torch.manual_seed(1234)
    model = tf.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * seed * torch.randn(p.shape, generator=gen) * p.std())
    return model


def synthetic(stats, k: int):
    """The measured statistics' structure (sites, counts) with seeded synthetic sums: x x^T of random rows in
    float64, so the digests depend on the merge's arithmetic, not on how a transformers install rounds a forward
    pass (two fresh installs of the same versions gave different Grams)."""
    gen = torch.Generator().manual_seed(200 + k)
    for name in sorted(stats.sites):
        site = stats.sites[name]
        rows = torch.randn(site.count, site.sum.shape[0], generator=gen, dtype=torch.float64)
        site.gram = (rows.T @ rows).to(site.gram.dtype)
        site.sum = rows.sum(0).to(site.sum.dtype)
    return stats


def prepare(root: Path, case: str, family: str, cls: str) -> dict:
    """K fine-tunes with Gram and (synthetic, seeded) Fisher statistics, and their base model."""
    models = []
    for k in range(K):
        model = build(case, family, cls, seed=k + 1)
        path = save_model(model, root / f"ft{k}")
        save(
            synthetic(
                measure(path, EXAMPLES[k * 3 : k * 3 + 4], batch_size=2, progress=False, protection=ALL_SITES), k
            ),
            root / f"gram{k}",
        )
        gen = torch.Generator().manual_seed(100 + k)
        with safe_open(path / "model.safetensors", "pt") as f:
            named = [(n, f.get_slice(n).get_shape()) for n in sorted(f.keys()) if f.get_slice(n).get_dtype() != "I64"]
        fisher = {n: torch.rand(shape, generator=gen) ** 4 for n, shape in named[1:]}  # the first has none: averaged
        save_fisher(fisher, path, root / f"fisher{k}", examples=10)
        models.append(path)
    base = save_model(build(case, family, cls, seed=0), root / "base")
    return {"models": models, "base": base, "root": root}


def recipe_of(prepared: dict, recipe: dict) -> MergeConfig:
    recipe = dict(recipe)
    stats = {"regmean": "gram", "fisher": "fisher"}.get(recipe["method"])
    weights = recipe.pop("weights", [1.0] * K)
    entries = []
    for k, path in enumerate(prepared["models"]):
        entry = {"path": str(path), "weight": weights[k]}
        if stats:
            entry["statistics"] = str(prepared["root"] / f"{stats}{k}")
        entries.append(entry)
    if recipe.pop("base", False):
        recipe["base_model"] = str(prepared["base"])
    return MergeConfig(models=entries, **recipe)


def digest(folder: Path) -> str:
    """One hash over every tensor (name, dtype, shape, bytes) of every weights file in `folder`, in name order."""
    h = hashlib.blake2b(digest_size=12)
    for file in sorted(folder.rglob("*.safetensors")):
        h.update(file.relative_to(folder).as_posix().encode())
        with safe_open(file, "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


PLAIN = {"regmean", "average", "average_weights", "task_arithmetic", "fisher"}
"""The variants checked against a plain merge on every machine (the others: by their digests, and by test_merge)."""


def merged_digests(root: Path, case: str) -> tuple[dict[str, str], list[str]]:
    """Each variant's digest, and what differs from a plain merge of the same files (`plain_merge_problems`)."""
    chosen = [v for v in variants() if v[0] == case]
    prepared = prepare(root, *chosen[0][:3])
    out, problems = {}, []
    for _, _, _, name, recipe in chosen:
        merge(recipe_of(prepared, recipe), root / name, progress=False)
        out[name] = digest(root / name)
        if name in PLAIN:
            problems += [f"{name}: {p}" for p in plain_merge_problems(prepared, recipe, root / name)]
    return out, problems


def plain_merge_problems(prepared: dict, recipe: dict, out: Path) -> list[str]:
    """Every merged tensor against the method's formula, computed plainly in float64 from the input files."""
    inputs = [load_file(Path(p) / "model.safetensors") for p in prepared["models"]]
    base = load_file(prepared["base"] / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    report = json.loads((out / "merge_report.json").read_text())
    solved = {row["tensor"]: row for row in report["layers"]}
    w = torch.tensor(recipe.get("weights", [1.0] * K), dtype=torch.float64)
    fishers = _fishers(prepared) if recipe["method"] == "fisher" else []
    problems = []
    for key, got in merged.items():
        values = [sd[key].double() for sd in inputs]
        if not got.is_floating_point():
            expected = inputs[0][key]
        elif key in solved:
            problems += _normal_equations(prepared, solved[key], got, values)
            continue
        elif recipe["method"] == "task_arithmetic":
            scaling = recipe["options"]["scaling"]
            expected = base[key].double() + scaling * sum(
                wi * (v - base[key].double()) for wi, v in zip(w, values, strict=True)
            )
        elif fishers and all(key in f for f in fishers):
            f = [fi[key].double() * wi + 1e-30 for fi, wi in zip(fishers, w, strict=True)]
            expected = sum(fi * v for fi, v in zip(f, values, strict=True)) / sum(f)
        else:
            expected = sum(wi * v for wi, v in zip(w, values, strict=True)) / w.sum()
        if not torch.allclose(got.double(), expected.double(), rtol=1e-5, atol=1e-6):
            problems.append(f"{key} differs from the plain merge by {float((got - expected).abs().max()):.3g}")
    return problems


def _normal_equations(prepared: dict, row: dict, got: torch.Tensor, values: list[torch.Tensor]) -> list[str]:
    """A RegMean layer (default options: alpha 0.9, each Gram over its row count) against its normal equations."""
    stats = [StatisticsFile(prepared["root"] / f"gram{k}").site(row["site"]) for k in range(K)]
    grams = [0.9 * s.gram.double() + 0.1 * torch.diag(torch.diag(s.gram.double())) for s in stats]
    module = meta_model(prepared["models"][0]).get_submodule(row["module"])
    transposed = isinstance(module, Conv1D)  # [d_in, d_out]
    ours, weights = (got.double().T, [v.T for v in values]) if transposed else (got.double(), values)
    residual = sum(g @ (ours - v).T / s.count for g, v, s in zip(grams, weights, stats, strict=True))
    reference = sum(g @ v.T / s.count for g, v, s in zip(grams, weights, stats, strict=True))
    ratio = float(residual.norm() / reference.norm())
    return [] if ratio < 1e-5 else [f"{row['tensor']}: normal-equation residual {ratio:.3g}"]


def _fishers(prepared: dict) -> list[dict[str, torch.Tensor]]:
    return [
        {
            k.removesuffix("::fisher"): t
            for k, t in load_file(prepared["root"] / f"fisher{k}" / "fisher.safetensors").items()
        }
        for k in range(K)
    ]


CASE_NAMES = list(dict.fromkeys(v[0] for v in variants()))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_merged_tensor_is_as_recorded(tmp_path, case):
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {"environment": None, "digests": {}}
    got, problems = merged_digests(tmp_path, case)
    assert not problems, f"{case}: merged tensors differ from a plain merge: {problems[:5]}"
    if os.environ.get("REGMEAN_RECORD_DIGESTS") == "1":
        recorded["environment"] = environment()
        recorded["digests"][case] = got
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    if recorded["environment"] != environment():  # the plain merge above is the check here
        pytest.skip(f"checked against a plain merge; digests recorded on {recorded['environment']}, not here")
    changed = {name: (recorded["digests"][case].get(name), d) for name, d in got.items()}
    changed = {name: pair for name, pair in changed.items() if pair[0] != pair[1]}
    assert not changed, f"{case}: merged tensors differ from the recorded ones in {sorted(changed)}"
