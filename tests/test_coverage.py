"""Architectures beyond the common families: every matrix RegMean does not solve is listed as averaged with its
reason (console, merge_report.json, card), e.g. GPT-OSS's 3-D experts; checkpoint keys that transformers renames on
loading (GPT-NeoX); inputs that follow no token (DeBERTa's relative-position projections) measured and solved."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from conftest import ALL_SITES, PAD, SEP, VOCAB, _config, save_model, write_jsonl
from safetensors.torch import load_file
from test_merge import normal_equation_residual, run, shrink
from torch.nn import functional
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from regmean.io.data import load_examples
from regmean.measure import measure
from regmean.stats import StatisticsFile, save


def fine_tuned(cls, config, seed: int, path: Path) -> Path:
    """One base (seed 1234) perturbed by `seed`, as a fine-tune of it, saved with a tokenizer."""
    torch.manual_seed(1234)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_model(model, path)


def tiny_gpt_oss(path: Path, seed: int) -> Path:
    config = tf.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        layer_types=["full_attention", "full_attention"],
        pad_token_id=PAD,
        eos_token_id=SEP,
    )
    return fine_tuned(tf.GptOssForCausalLM, config, seed, path)


def test_experts_fused_on_disk_are_solved_row_by_row(tmp_path):
    """GPT-OSS stores its experts as 3-D tensors, transposed ([E, in, out]), gate and up interleaved, with biases
    and its own gating: each expert's statistics match a plain eager run, each expert (a row of the 3-D tensor)
    is solved on them (normal equations), its routers too; the biases are averaged and listed."""
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    models = []
    for k in range(2):
        path = tiny_gpt_oss(tmp_path / f"m{k}", k + 1)
        save(measure(path, examples, progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    stats = [StatisticsFile(m["statistics"]) for m in models]
    for site, gram in routed_grams(Path(models[0]["path"]), examples).items():
        torch.testing.assert_close(stats[0].site(site).gram.double(), gram, rtol=1e-5, atol=1e-5 * gram.abs().max())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models}))
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    _, info = tf.GptOssForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    merged = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    averaged = report["averaged"]
    key = "model.layers.1.mlp.experts.gate_up_proj"
    rows = [row for row in report["layers"] if row["tensor"] == key]
    assert sorted(int(row["module"].split(".")[-2]) for row in rows) == [0, 1, 2, 3]
    for row in rows:
        e = int(row["module"].split(".")[-2])
        sites = [st.site(row["site"]) for st in stats]
        grams, scale = [shrink(s.gram.double(), 0.9) for s in sites], [1.0 / s.count for s in sites]
        weights = [sd[key][e].T.double() for sd in inputs]
        assert normal_equation_residual(merged[key][e].T.double(), weights, grams, scale) < 1e-4, row["module"]
    assert {row["tensor"] for row in report["layers"]} >= {"model.layers.0.mlp.router.weight", key}
    assert averaged["model.layers.0.mlp.experts.down_proj_bias"].startswith("experts' biases")
    assert averaged["lm_head.weight"] == "LM head (lm_head: average)"
    for key in averaged:  # what the report says is what was done
        torch.testing.assert_close(merged[key], (inputs[0][key] + inputs[1][key]) / 2, msg=key)


def tiny_neox(path: Path, seed: int) -> Path:
    config = tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=SEP,
    )
    return fine_tuned(tf.GPTNeoXForCausalLM, config, seed, path)


def test_a_checkpoint_key_renamed_on_loading_merges(tmp_path):
    """GPT-NeoX's checkpoint stores the parameter lm_head.weight as embed_out.weight: it is averaged (named as an
    LM head) or solved by RegMean (lm_head: regmean, its normal equations hold), and the output loads whole."""
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    models = []
    for k in range(2):
        path = tiny_neox(tmp_path / f"m{k}", k + 1)
        save(measure(path, examples, progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    for lm_head in ("average", "regmean"):
        recipe = tmp_path / f"{lm_head}.yaml"
        recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models, "lm_head": lm_head}))
        out = tmp_path / lm_head
        result = run("merge", recipe, out)
        assert result.exit_code == 0, result.output
        _, info = tf.GPTNeoXForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        report = json.loads((out / "merge_report.json").read_text())
        solved = {row["module"] for row in report["layers"]}
        if lm_head == "average":
            assert report["averaged"]["embed_out.weight"] == "LM head (lm_head: average)"
            assert "lm_head" not in solved
        else:
            assert "embed_out.weight" not in report["averaged"] and "lm_head" in solved
            merged = load_file(out / "model.safetensors")["embed_out.weight"].double()
            sites = [st.site(st.modules["lm_head"]) for st in map(StatisticsFile, (m["statistics"] for m in models))]
            weights = [load_file(Path(m["path"]) / "model.safetensors")["embed_out.weight"].double() for m in models]
            grams = [shrink(s.gram.double(), 0.9) for s in sites]
            assert normal_equation_residual(merged, weights, grams, [1 / s.count for s in sites]) < 1e-4


def tiny_llava(path: Path, seed: int) -> Path:
    """A vision-language model (CLIP tower, Llama text model): measured on text, its vision tower never runs."""
    text = _config("llama")
    vision = tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1)
    return fine_tuned(tf.LlavaForConditionalGeneration, config, seed, path)


def test_a_vision_language_model_measured_on_text_solves_its_text_layers(tmp_path):
    """Issue 26: the vision tower's linear layers never run on text: measure says so and records why (it used to
    refuse), the merge solves every text layer (normal equations) and lists each vision layer as averaged, saying
    why; the output loads whole."""
    from typer.testing import CliRunner

    from regmean.cli import app

    data = write_jsonl(tmp_path / "d.jsonl")
    models = []
    for k in range(2):
        path = tiny_llava(tmp_path / f"m{k}", k + 1)
        said = CliRunner().invoke(app, ["measure", str(path), "--data", str(data), "--out", str(tmp_path / f"s{k}")])
        assert said.exit_code == 0 and "8 linear modules never ran on this data" in said.output.replace("\n", " "), (
            said.output
        )
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    only = ["measure", str(path), "--data", str(data), "--out", str(tmp_path / "v"), "--include", "vision_tower"]
    said = CliRunner().invoke(app, only)  # sweep 6 R1: only modules that never run were a misleading error
    assert said.exit_code != 0 and "none of the 6 selected linear modules ran on this data" in said.output
    assert not (tmp_path / "v").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models}))
    assert run("merge", recipe, tmp_path / "out").exit_code == 0
    _, info = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    never = sorted(k for k, why in report["averaged"].items() if "never called in a forward pass on this data" in why)
    assert len(never) == 8 and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in never), never
    merged = load_file(tmp_path / "out" / "model.safetensors")
    files = [StatisticsFile(m["statistics"]) for m in models]
    for row in report["layers"]:
        assert "vision" not in row["module"]
        sites = [st.site(st.modules[row["module"]]) for st in files]
        weights = [load_file(Path(m["path"]) / "model.safetensors")[row["tensor"]].double() for m in models]
        grams = [shrink(s.gram.double(), 0.9) for s in sites]
        residual = normal_equation_residual(
            merged[row["tensor"]].double(), weights, grams, [1 / s.count for s in sites]
        )
        assert residual < 1e-4, row["module"]
    assert len(report["layers"]) == 11  # the 14 text projections less the 3 withheld token sites


def tiny_deberta(path: Path, seed: int, v3: bool) -> Path:
    """DeBERTa-v2 (relative positions, own position projections) or -v3 (shared query/key projections read both the
    tokens and the relative-position embeddings)."""
    v3_options = {"share_att_key": True, "position_buckets": 8, "norm_rel_ebd": "layer_norm"} if v3 else {}
    config = tf.DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        max_relative_positions=16,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        pad_token_id=PAD,
        **v3_options,
    )
    return fine_tuned(tf.DebertaV2ForSequenceClassification, config, seed, path)


@pytest.mark.parametrize("v3", [False, True], ids=["deberta-v2", "deberta-v3"])
def test_deberta_position_projections_are_measured_and_solved(tmp_path, v3):
    """Inputs that follow no token (the relative-position embeddings) are measured whole, every call: v2's
    pos_key_proj Gram is batches x R^T R of the model's own relative embeddings R; every linear layer is solved
    (normal equations), only embedding tables are averaged, and the output loads whole."""
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    models = []
    for k in range(2):
        path = tiny_deberta(tmp_path / f"m{k}", k + 1, v3)
        save(measure(path, examples, batch_size=4, progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    stats = [StatisticsFile(m["statistics"]) for m in models]
    if not v3:
        model = tf.DebertaV2ForSequenceClassification.from_pretrained(models[0]["path"]).eval()
        with torch.no_grad():
            rel = model.deberta.encoder.get_rel_embedding().double()
        site = stats[0].site(stats[0].modules["deberta.encoder.layer.0.attention.self.pos_key_proj"])
        batches = -(-len(examples) // 4)
        torch.testing.assert_close(site.gram.double(), batches * rel.T @ rel, rtol=1e-5, atol=1e-6)
        assert site.count == batches * rel.shape[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models}))
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    _, info = tf.DebertaV2ForSequenceClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert all("Embedding" in why or why.startswith("embedding") for why in report["averaged"].values())
    merged = load_file(tmp_path / "out" / "model.safetensors")
    projection = "query_proj" if v3 else "pos_key_proj"
    for layer in range(2):
        module = f"deberta.encoder.layer.{layer}.attention.self.{projection}"
        sites = [st.site(st.modules[module]) for st in stats]
        weights = [load_file(Path(m["path"]) / "model.safetensors")[f"{module}.weight"].double() for m in models]
        grams = [shrink(s.gram.double(), 0.9) for s in sites]
        residual = normal_equation_residual(
            merged[f"{module}.weight"].double(), weights, grams, [1 / s.count for s in sites]
        )
        assert residual < 1e-4, module


def test_rows_that_follow_no_example_are_left_out_of_a_dp_release(tmp_path):
    from regmean.measure.protect import Protection
    from regmean.stats import NO_EXAMPLE_BOUND

    path = tiny_deberta(tmp_path / "m", 1, v3=True)
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    stats = measure(path, examples, batch_size=4, progress=False, protection=Protection(withhold=False, epsilon=4.0))
    left_out = {m for m, why in stats.skipped.items() if why == NO_EXAMPLE_BOUND}
    assert {
        f"deberta.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query_proj", "key_proj")
    } == left_out
    assert all(stream in ("input", "example") for stream, _ in stats.site_streams.values())


MOE_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "pad_token_id": PAD,
    "eos_token_id": SEP,
}
MOE = {
    "MixtralForCausalLM": ("MixtralConfig", {"intermediate_size": 24, "num_local_experts": 4}),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        {"intermediate_size": 24, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12, "num_experts": 4},
    ),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {"moe_intermediate_size": 8, "num_experts": 4, "head_dim": 4}),
    "OlmoeForCausalLM": ("OlmoeConfig", {"intermediate_size": 8, "num_experts": 4}),
    "DeepseekV3ForCausalLM": (
        "DeepseekV3Config",
        {
            **{"intermediate_size": 24, "moe_intermediate_size": 8, "n_routed_experts": 4, "n_shared_experts": 1},
            **{"n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 8, "kv_lora_rank": 8},
            **{"qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4},
        },
    ),
}


class ExpertInputs(TorchFunctionMode):
    """Records the rows every matrix product on a slice of an expert parameter reads (F.linear or @), by the
    slice's storage address: the oracle for the experts' statistics, with nothing of ours in it."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names, self.grams = names, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (functional.linear, torch.matmul, torch.Tensor.__matmul__) and len(args) >= 2:
            site = self.names.get(args[1].data_ptr())
            if site is not None:
                rows = args[0].reshape(-1, args[0].shape[-1]).double()
                self.grams[site] = self.grams.get(site, 0) + rows.T @ rows
        return func(*args, **kwargs)


def routed_grams(path: Path, examples) -> dict[str, torch.Tensor]:
    """Each expert's input Grams, computed plainly: the model run eagerly one example at a time (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    names = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            for e in range(module.gate_up_proj.shape[0]):
                names[module.gate_up_proj[e].data_ptr()] = f"{name}.{e}.gate_proj"
                names[module.down_proj[e].data_ptr()] = f"{name}.{e}.down_proj"
    recorder = ExpertInputs(names)
    with recorder, torch.no_grad():
        for example in examples:
            model(**tokenizer(example.text, return_tensors="pt", truncation=True, max_length=128))
    return recorder.grams


@pytest.mark.parametrize(
    "cls", [cls if cls == "MixtralForCausalLM" else pytest.param(cls, marks=pytest.mark.slow) for cls in MOE]
)
def test_moe_experts_are_measured_on_their_routed_tokens_and_solved_one_by_one(tmp_path, cls):
    """One key per expert on disk (as save_pretrained writes them), fused 3-D parameters once loaded: each
    expert's Grams are those of the tokens routed to it (against a plain eager run, for the first family), each
    expert projection and router is solved (normal equations from the files' Grams), the shared and dense layers
    too; written back in the checkpoint's layout, loading with no missing or unexpected keys."""
    config_class, options = MOE[cls]
    config = getattr(tf, config_class)(**MOE_COMMON, **options, num_experts_per_tok=2)
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    models = []
    for k in range(2):
        path = fine_tuned(getattr(tf, cls), config, k + 1, tmp_path / f"m{k}")
        save(measure(path, examples, batch_size=4, progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    stats = [StatisticsFile(m["statistics"]) for m in models]
    assert {stream for stream, _ in stats[0].site_streams.values()} == {"input", "routed"}
    if cls == next(iter(MOE)):
        for site, gram in routed_grams(Path(models[0]["path"]), examples).items():
            torch.testing.assert_close(stats[0].site(site).gram.double(), gram, rtol=1e-5, atol=1e-5 * gram.abs().max())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models}))
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    _, info = getattr(tf, cls).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(Path(m["path"]) / "model.safetensors") for m in models]
    assert merged.keys() == inputs[0].keys()
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    solved = {row["tensor"]: row for row in report["layers"]}
    assert set(solved) | set(report["averaged"]) == {key for key, t in merged.items() if t.dim() >= 2}
    routed = {m for m, site in stats[0].modules.items() if stats[0].site_streams[site][0] == "routed"}
    assert routed and routed <= {row["module"] for row in report["layers"]}  # every expert projection solved
    for key, row in solved.items():
        sites = [st.site(row["site"]) for st in stats]
        grams, scale = [shrink(s.gram.double(), 0.9) for s in sites], [1.0 / s.count for s in sites]
        weights = [sd[key].double() for sd in inputs]
        assert normal_equation_residual(merged[key].double(), weights, grams, scale) < 1e-4, key
    assert not any(why.startswith(("linear layer", "not a linear")) for why in report["averaged"].values())


def test_a_checkpoint_key_split_on_loading_is_one_stacked_layer():
    """Issue 26: Lara-mini's checkpoint stores linear_attn.in_proj, which transformers splits by rows into four
    projections of the same input; the merge takes the key as one layer of their stacked rows (the slow matrix
    solves it against the normal equations)."""
    from architectures import ARCHITECTURES

    from regmean.architecture import linear_layers
    from regmean.checkpoint_keys import split_layers, split_parameters

    arch = next(a for a in ARCHITECTURES if a.cls == "LaraMiniForCausalLM")
    model = getattr(tf, arch.cls)(getattr(tf, arch.config)(**arch.options))
    prefix = "model.layers.0.linear_attn."
    splits = split_parameters(model, [f"{prefix}in_proj.weight", f"{prefix}out_proj.weight"])
    parts = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]
    assert splits == {f"{prefix}in_proj.weight": [f"{prefix}{p}.weight" for p in parts]}
    layers = split_layers(linear_layers(model), splits)
    stacked = layers[f"{prefix}in_proj_qkv"]
    rows = sum(model.get_submodule(prefix + p).weight.shape[0] for p in parts)
    assert (stacked.weight_key, stacked.d_out, stacked.d_in) == (f"{prefix}in_proj.weight", rows, 16)
    assert not any(f"{prefix}{p}" in layers for p in parts[1:])
