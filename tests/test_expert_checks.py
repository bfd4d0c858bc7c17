"""A mixture-of-experts model's statistics against the model: only experts' inputs are routed, an expert's two inputs
count the same tokens, a block's experts top-k x the tokens in all (top-k from the model's own config), and experts'
Grams are scale-checked where they saw enough tokens. Each forgery of the final sweep (F4, F5, F6, F9, F11) is
refused in one line naming the file, inputs untouched, nothing written."""

import json
import shutil

import pytest
import torch
import transformers as tf
from conftest import ALL_SITES, TARGETS, TEXTS, write_jsonl
from test_bad_input import merge_fails
from test_coverage import MOE_COMMON, fine_tuned
from test_hostile_input import rewrite
from test_merge import run, write_config

from regmean.io.data import load_examples
from regmean.measure import measure
from regmean.stats import StatisticsFile, save

EXPERTS = "model.layers.0.mlp.experts"
QUERY = "model.layers.0.self_attn.q_proj"
TOP_K = 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Two fine-tunes of a tiny Mixtral (4 experts, top-2) measured on 200 examples: every expert sees over 64
    tokens."""
    root = tmp_path_factory.mktemp("moe")
    config = tf.MixtralConfig(**MOE_COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=TOP_K)
    examples = load_examples(write_jsonl(root / "d.jsonl", TEXTS * 25, TARGETS * 25))
    for k in range(2):
        path = fine_tuned(tf.MixtralForCausalLM, config, k + 1, root / f"m{k}")
        save(measure(path, examples, batch_size=32, progress=False, protection=ALL_SITES), root / f"s{k}")
    return root


@pytest.fixture
def moe(measured, tmp_path):
    shutil.copytree(measured, tmp_path / "in")
    models = [{"path": str(tmp_path / "in" / f"m{k}"), "statistics": str(tmp_path / "in" / f"s{k}")} for k in range(2)]
    return tmp_path, models


def test_routed_counts_satisfy_the_routing(measured):
    """Counted plainly from the files: each expert's gate and down inputs see the same tokens, the four experts
    together top-k x the tokens, and each expert more than 64 of them."""
    st = StatisticsFile(measured / "s0")
    for layer in range(2):
        gate = [st.count(f"model.layers.{layer}.mlp.experts.{e}.gate_proj") for e in range(4)]
        down = [st.count(f"model.layers.{layer}.mlp.experts.{e}.down_proj") for e in range(4)]
        assert gate == down and sum(gate) == TOP_K * st.tokens and min(gate) > 64


def streams(change):
    def edit(meta):
        value = json.loads(meta["site_streams"])
        change(value)
        meta["site_streams"] = json.dumps(value)

    return edit


def count_of(site: str, change):
    def edit(tensors):
        tensors[f"{site}::count"] = torch.tensor([change(int(tensors[f"{site}::count"][0]))], dtype=torch.int64)

    return edit


def experts_scaled(tensors):
    for key in list(tensors):
        if ".experts." in key and key.endswith("::gram_upper"):
            tensors[key] = tensors[key] * 1e6
        elif ".experts." in key and key.endswith("::sum"):
            tensors[key] = tensors[key] * 1e3


def expert_0_times_10(tensors):
    """Expert 0's routed hidden states as if x 10: within the models' scale spread, beyond its router's trace."""
    site = f"{EXPERTS}.0.gate_proj"
    tensors[f"{site}::gram_upper"] = tensors[f"{site}::gram_upper"] * 100
    tensors[f"{site}::sum"] = tensors[f"{site}::sum"] * 10


def one_more_token(tensors):
    """Expert 0's both inputs count one more row (still consistent with each other and their bounds)."""
    for part in ("gate_proj", "down_proj"):
        count_of(f"{EXPERTS}.0.{part}", lambda n: n + 1)(tensors)


GONE = {f"{EXPERTS}.3.gate_proj", f"{EXPERTS}.3.down_proj"}


def drop_expert_3(tensors):
    for key in [k for k in tensors if k.split("::")[0] in GONE]:
        del tensors[key]


def unlist_expert_3(meta):
    meta["modules"] = json.dumps({m: s for m, s in json.loads(meta["modules"]).items() if s not in GONE})
    streams(lambda v: [v.pop(s) for s in GONE])(meta)


FORGERIES = {
    "F4 plain site marked routed": ((0, 1), streams(lambda v: v.__setitem__(QUERY, ["routed", 1])), None, "routed"),
    "expert site marked input": (
        (0, 1),
        streams(lambda v: v.__setitem__(f"{EXPERTS}.1.down_proj", ["input", 1])),
        None,
        "stream 'input'",
    ),
    "F6 one input's count": ((1,), None, count_of(f"{EXPERTS}.2.gate_proj", lambda n: 1), "counts 1 rows at site"),
    "F6 both inputs' counts": ((1,), None, one_more_token, "routed rows in all"),
    "F6 experts' Grams scaled": ((1,), None, experts_scaled, "mean squared norm"),
    "F6 one expert x 10": ((1,), None, expert_0_times_10, "than all the tokens its router read"),
}


@pytest.mark.parametrize("case", FORGERIES)
def test_forged_expert_statistics_are_refused(moe, case):
    tmp_path, models = moe
    files, meta_change, tensor_change, says = FORGERIES[case]
    for k in files:
        rewrite(tmp_path / "in" / f"s{k}" / "statistics.safetensors", meta_change, tensor_change)
    named = models[files[-1]]["statistics"]
    merge_fails(tmp_path, {"method": "regmean", "models": models}, named, says)


def test_a_model_of_another_routing_is_refused(moe):
    """F11: model 1's config routes each token to one expert, its statistics were measured at two: refused; merged
    without statistics, the difference is said in the console and the card."""
    tmp_path, models = moe
    config = tmp_path / "in" / "m1" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_experts_per_tok": 1}))
    merge_fails(tmp_path, {"method": "regmean", "models": models}, models[1]["statistics"], "another routing")
    data_free = [{"path": m["path"]} for m in models]  # no statistics to contradict: merged, and said
    result = run("merge", write_config(tmp_path, method="average", models=data_free), tmp_path / "avg")
    assert result.exit_code == 0, result.output
    said = f"num_experts_per_tok: 1 in {models[1]['path']}, 2 in {models[0]['path']}"
    assert said in " ".join(result.output.split()) and said in (tmp_path / "avg" / "README.md").read_text()


def test_a_file_missing_an_expert_is_named(moe):
    """F9: the file that lacks expert 3 is named (not only the module)."""
    tmp_path, models = moe
    path = tmp_path / "in" / "s1" / "statistics.safetensors"
    rewrite(path, unlist_expert_3, drop_expert_3)
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(path), "has no statistics for module")


def test_a_top_k_that_is_not_a_count_is_refused(moe):
    """Sweep 4 F2 (G04): a string top-k switched the routing check off."""
    tmp_path, models = moe
    config = tmp_path / "in" / "m1" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_experts_per_tok": "2"}))
    merge_fails(tmp_path, {"method": "regmean", "models": models}, str(config), "not a count of experts")
