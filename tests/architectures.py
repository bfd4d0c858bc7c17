"""The architecture matrix: every transformers class the tests build tiny, measure and merge, with how it is merged.

`tests/test_architectures.py` runs every row (RegMean, normal equations from the statistics files, every matrix
solved or listed as averaged); `python tests/architectures.py` prints the README's table from the same rows, and a
test checks the README holds that table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conftest import PAD, SEP, VOCAB

DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": PAD,
    "bos_token_id": 101,
    "eos_token_id": SEP,
}
ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": PAD,
}
MOE = {**DECODER, "num_key_value_heads": 4, "num_experts_per_tok": 2}


@dataclass(frozen=True)
class Architecture:
    cls: str
    config: str
    options: dict = field(default_factory=dict)
    family: str = ""
    notes: str = ""
    targets: bool = False
    """An encoder-decoder LM: examples need decoder targets."""


ARCHITECTURES = [
    Architecture("ElectraForSequenceClassification", "ElectraConfig", {**ENCODER, "embedding_size": 16}, "ELECTRA"),
    Architecture("XLMRobertaForSequenceClassification", "XLMRobertaConfig", ENCODER, "XLM-R"),
    Architecture(
        "ModernBertForSequenceClassification",
        "ModernBertConfig",
        {**ENCODER, "global_attn_every_n_layers": 1, "local_attention": 16},
        "ModernBERT",
    ),
    Architecture(
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        {**ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16},
        "DeBERTa-v2/v3",
        "relative-position projections measured on their true inputs (whole, every call)",
    ),
    Architecture(
        "BartForConditionalGeneration",
        "BartConfig",
        {
            **{"vocab_size": VOCAB, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1},
            **{"encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 24},
            **{"decoder_ffn_dim": 24, "max_position_embeddings": 64, "pad_token_id": PAD, "eos_token_id": SEP},
            **{"decoder_start_token_id": SEP, "forced_eos_token_id": SEP},
        },
        "BART",
        "decoder and cross-attention sites by their own masks",
        targets=True,
    ),
    Architecture("MistralForCausalLM", "MistralConfig", DECODER, "Mistral"),
    # Qwen2's tokenizer class adds <|endoftext|> to the test's vocabulary: room for it
    Architecture("Qwen2ForCausalLM", "Qwen2Config", {**DECODER, "vocab_size": VOCAB + 8}, "Qwen2"),
    Architecture("Qwen3ForCausalLM", "Qwen3Config", {**DECODER, "head_dim": 4}, "Qwen3"),
    Architecture("Gemma2ForCausalLM", "Gemma2Config", {**DECODER, "head_dim": 4}, "Gemma-2"),
    Architecture("Gemma3ForCausalLM", "Gemma3TextConfig", {**DECODER, "head_dim": 4}, "Gemma-3"),
    Architecture("Phi3ForCausalLM", "Phi3Config", DECODER, "Phi-3", "fused qkv and gate/up solved as one layer each"),
    Architecture("OlmoForCausalLM", "OlmoConfig", DECODER, "OLMo"),
    Architecture("Olmo2ForCausalLM", "Olmo2Config", DECODER, "OLMo-2"),
    Architecture(
        "FalconForCausalLM",
        "FalconConfig",
        {**{k: v for k, v in DECODER.items() if k not in ("intermediate_size", "num_key_value_heads")}},
        "Falcon",
    ),
    Architecture("StableLmForCausalLM", "StableLmConfig", DECODER, "StableLM"),
    Architecture(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
        "GPT-NeoX",
        "checkpoint's `embed_out` placed as transformers renames it",
    ),
    Architecture(
        "MixtralForCausalLM",
        "MixtralConfig",
        {**MOE, "num_local_experts": 4},
        "Mixtral",
        "experts solved one by one on their routed tokens; routers solved",
    ),
    Architecture(
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        {**MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12, "num_experts": 4},
        "Qwen2-MoE",
        "experts one by one; shared expert and routers solved",
    ),
    Architecture(
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "head_dim": 4},
        "Qwen3-MoE",
        "experts one by one; routers solved",
    ),
    Architecture(
        "OlmoeForCausalLM",
        "OlmoeConfig",
        {**MOE, "intermediate_size": 8, "num_experts": 4},
        "OLMoE",
        "experts one by one; routers solved",
    ),
    Architecture(
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        {
            **MOE,
            **{"moe_intermediate_size": 8, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 1},
            **{"topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 8, "kv_lora_rank": 8},
            **{"qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4},
        },
        "DeepSeek-V3",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "GptOssForCausalLM",
        "GptOssConfig",
        {**MOE, "head_dim": 4, "num_local_experts": 4, "layer_types": ["full_attention", "full_attention"]},
        "GPT-OSS",
        "experts stored fused (3-D, transposed, biased) solved row by row; routers solved",
    ),
]
"""Beyond the fast tier's families (tests/conftest.py CASES: BERT, RoBERTa, DistilBERT, T5, GPT-2, Llama)."""

FAST = {
    "BERT": "BertForSequenceClassification, BertForTokenClassification",
    "RoBERTa": "RobertaForSequenceClassification",
    "DistilBERT": "DistilBertForSequenceClassification",
    "T5": "T5ForSequenceClassification, T5ForConditionalGeneration",
    "GPT-2": "GPT2ForSequenceClassification, GPT2LMHeadModel (Conv1D layers)",
    "Llama": "LlamaForCausalLM, LlamaForSequenceClassification",
}


def table() -> str:
    """The README's architecture table."""
    rows = ["| family | classes tested | how it merges | tier |", "|---|---|---|---|"]
    rows += [f"| {family} | {classes} | every linear layer solved | fast |" for family, classes in FAST.items()]
    for a in ARCHITECTURES:
        rows.append(f"| {a.family} | {a.cls} | {a.notes or 'every linear layer solved'} | slow |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
