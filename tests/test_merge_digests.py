"""Every merged tensor of every method and option, on the tiny models of every family, bit for bit as recorded.

The digests in data/merge_digests.json were recorded before the merge engine was restructured, so any change in
what a merge computes (not only a wrong answer: a reordered sum, a different dtype) shows here. RegMean's were
recorded again when its solve moved to float64 products in deviation form (closer to the exact optimum); every
other method's digests were the same before and after that change. They depend on the machine's arithmetic
(torch and transformers versions, CPU kernels, thread count); on another machine the test is skipped with that
reason, and `REGMEAN_RECORD_DIGESTS=1` records that machine's own. (Twice a fresh install of the same versions did
not reproduce RegMean's digests while every other method's held: the Grams' forward passes rounded differently. The
Grams are now seeded synthetic sums over the measured sites, and RegMean's digests were recorded again.)
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

from regmean.io.data import Example
from regmean.measure import measure
from regmean.measure.fisher import save_fisher
from regmean.merge import MergeConfig, merge
from regmean.stats import save

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


def merged_digests(root: Path, case: str) -> dict[str, str]:
    chosen = [v for v in variants() if v[0] == case]
    prepared = prepare(root, *chosen[0][:3])
    out = {}
    for _, _, _, name, recipe in chosen:
        merge(recipe_of(prepared, recipe), root / name, progress=False)
        out[name] = digest(root / name)
    return out


CASE_NAMES = list(dict.fromkeys(v[0] for v in variants()))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_merged_tensor_is_as_recorded(tmp_path, case):
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {"environment": None, "digests": {}}
    got = merged_digests(tmp_path, case)
    if os.environ.get("REGMEAN_RECORD_DIGESTS") == "1":
        recorded["environment"] = environment()
        recorded["digests"][case] = got
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    if recorded["environment"] != environment():
        pytest.skip(f"digests recorded on {recorded['environment']}, this is {environment()}")
    changed = {name: (recorded["digests"][case].get(name), d) for name, d in got.items()}
    changed = {name: pair for name, pair in changed.items() if pair[0] != pair[1]}
    assert not changed, f"{case}: merged tensors differ from the recorded ones in {sorted(changed)}"
