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
OWN_TOP_K = {**DECODER, "num_key_value_heads": 4}
"""MOE for configs that name top-k otherwise (Aria's moe_topk, Gemma-4's top_k_experts): read under that name."""
MLA = {"q_lora_rank": 8, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4}
"""DeepSeek-style low-rank attention."""
INKLING2 = {
    **{**MOE, "moe_intermediate_size": 8, "n_routed_experts": 4, "head_dim": 4, "n_layers_per_attn_res_block": 1},
    **{"swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_head_dim": 4, "unpadded_vocab_size": VOCAB},
}
"""Inkling-2 and its looped variant."""
ROUTED = {"moe_intermediate_size": 8, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 1, "topk_group": 1}
"""DeepSeek-style experts: 4 routed, 1 shared, one group."""


@dataclass(frozen=True)
class Architecture:
    cls: str
    config: str
    options: dict = field(default_factory=dict)
    family: str = ""
    notes: str = ""
    targets: bool = False
    """An encoder-decoder LM: examples need decoder targets."""
    never_run: int = 0
    """Linear layers never called as modules on text (a vision-language model's vision tower, a weight the parent
    applies itself): averaged, and said why."""


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
    Architecture(
        "AfmoeForCausalLM",
        "AfmoeConfig",
        {
            **MOE,
            "moe_intermediate_size": 8,
            "num_experts": 4,
            "num_dense_layers": 1,
            "num_shared_experts": 1,
            "head_dim": 4,
        },
        "AFMoE",
        "experts one by one; shared expert and the router's linear solved",
    ),
    # transposed experts of non-square rows (2 x 12 != 16): the test tells their orientation by shape
    Architecture(
        "AriaTextForCausalLM",
        "AriaTextConfig",
        {
            **OWN_TOP_K,
            "intermediate_size": 12,
            "moe_num_experts": 4,
            "moe_topk": 2,
            "moe_num_shared_experts": 1,
            "head_dim": 4,
        },
        "Aria",
        "experts stored fused (3-D, transposed) solved row by row; shared experts and routers solved; top-k read from "
        "`moe_topk`",
    ),
    Architecture(
        "AXK1ForCausalLM",
        "AXK1Config",
        {**MOE, **ROUTED, **MLA, "mlp_layer_types": ["dense", "sparse"]},
        "AXK1",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "AXK2ForCausalLM",
        "AXK2Config",
        {**MOE, **ROUTED, **MLA, "index_topk": 4, "index_head_dim": 4},
        "AXK2",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "BailingHybridForCausalLM",
        "BailingHybridConfig",
        {
            **{**MOE, **MLA, "moe_intermediate_size": 8, "num_experts": 4, "num_shared_experts": 1, "head_dim": 4},
            **{"num_expert_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "layer_group_size": 2},
            **{"linear_head_dim": 4, "linear_num_heads": 4},
        },
        "Bailing hybrid",
        "experts one by one; shared experts, low-rank attention and routers solved; top-k read from "
        "`num_experts_per_token`; short convolutions averaged (not linear layers)",
    ),
    Architecture(
        "BeamForCausalLM",
        "BeamConfig",
        {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "n_group": 1, "topk_group": 1, "head_dim": 4}
        | {"mlp_layer_types": ["dense", "sparse"]},
        "Beam",
        "experts one by one; routers solved",
    ),
    Architecture(
        "Cohere2MoeForCausalLM",
        "Cohere2MoeConfig",
        {**MOE, "num_experts": 4, "head_dim": 4},
        "Cohere2-MoE",
        "experts one by one; routers solved",
    ),
    # transformers' DBRX attention reads attn_config.rope_theta and needs clip_qkv set
    Architecture(
        "DbrxForCausalLM",
        "DbrxConfig",
        {
            **{k: DECODER[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")},
            **{"d_model": 16, "n_heads": 4, "n_layers": 2, "max_seq_len": 64},
            "attn_config": {"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2},
        },
        "DBRX",
        "experts averaged, and said: DbrxExpertGLU keeps them as 2-D stacks (w1, v1, w2), a layout RegMean does not "
        "measure; routers solved",
    ),
    Architecture(
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        {**MOE, **ROUTED, **MLA, "first_k_dense_replace": 1},
        "DeepSeek-V2",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "DeepseekV32ForCausalLM",
        "DeepseekV32Config",
        {**MOE, **ROUTED, **MLA, "first_k_dense_replace": 1, "index_topk": 4, "index_head_dim": 4},
        "DeepSeek-V3.2",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "DeepseekV4ForCausalLM",
        "DeepseekV4Config",
        {
            **{**MOE, **ROUTED, "num_key_value_heads": 1, "head_dim": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4},
            **{
                "o_groups": 2,
                "o_lora_rank": 8,
                "index_head_dim": 4,
                "index_topk": 4,
                "mlp_layer_types": ["moe", "moe"],
            },
        },
        "DeepSeek-V4",
        "experts one by one; shared experts and routers solved; hyper-connection and compressor tensors averaged (not "
        "linear layers)",
    ),
    Architecture(
        "DogeForCausalLM",
        "DogeConfig",
        {**MOE, "is_moe": True, "num_experts": 4},
        "Doge",
        "retrieval experts (rows of two Embedding tables, product-key routed) averaged, and said; shared MLP and "
        "router solved",
    ),
    Architecture(
        "Dots1ForCausalLM",
        "Dots1Config",
        {**MOE, **ROUTED, "first_k_dense_replace": 1},
        "dots.llm1",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "Dots3NoteForCausalLM",
        "Dots3NoteTextConfig",
        {**MOE, **ROUTED, **MLA, "head_dim": 4, "index_topk": 4, "index_head_dim": 4}
        | {"shared_experts_intermediate_size": 8},
        "dots3-note",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        {**MOE, "moe_intermediate_size": 8, "moe_num_experts": 4, "moe_k": 2, "moe_num_shared_experts": 1}
        | {"moe_layer_start_index": 1, "moe_layer_end_index": 1},
        "ERNIE-4.5-MoE",
        "experts one by one; shared experts and routers solved; top-k read from `moe_k`",
    ),
    Architecture(
        "ExaoneMoeForCausalLM",
        "ExaoneMoeConfig",
        {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "first_k_dense_replace": 1, "num_shared_experts": 1},
        "EXAONE-MoE",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "FlexOlmoForCausalLM",
        "FlexOlmoConfig",
        {**MOE, "intermediate_size": 8, "num_experts": 4},
        "FlexOlmo",
        "experts one by one; routers solved",
    ),
    Architecture(
        "FlintForCausalLM",
        "FlintConfig",
        {**MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12, "num_experts": 4}
        | {"mlp_only_layers": [0], "head_dim": 4},
        "Flint",
        "experts one by one; routers solved",
    ),
    Architecture(
        "Gemma4ForCausalLM",
        "Gemma4TextConfig",
        {**OWN_TOP_K, "head_dim": 4, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2}
        | {"moe_intermediate_size": 8, "hidden_size_per_layer_input": 4},
        "Gemma-4 (MoE)",
        "experts stored fused (3-D) solved row by row, beside the dense MLP; the router's linear solved; top-k read "
        "from `top_k_experts`",
    ),
    Architecture(
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        {**MOE, **ROUTED, "first_k_dense_replace": 1, "head_dim": 4},
        "GLM-4-MoE",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "Glm4MoeLiteForCausalLM",
        "Glm4MoeLiteConfig",
        {**MOE, **ROUTED, **MLA, "first_k_dense_replace": 1},
        "GLM-4-MoE-Lite",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "GlmMoeDsaForCausalLM",
        "GlmMoeDsaConfig",
        {**MOE, **ROUTED, **MLA, "first_k_dense_replace": 1, "index_topk": 4, "index_head_dim": 4},
        "GLM-MoE-DSA",
        "experts one by one; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "GraniteMoeForCausalLM",
        "GraniteMoeConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4},
        "Granite-MoE",
        "experts stored fused (3-D) solved row by row; routers solved",
    ),
    Architecture(
        "GraniteMoeSWAForCausalLM",
        "GraniteMoeSWAConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4, "sliding_window": 8},
        "Granite-MoE-SWA",
        "experts stored fused (3-D) solved row by row; routers solved",
    ),
    Architecture(
        "GraniteMoeSharedForCausalLM",
        "GraniteMoeSharedConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4, "shared_intermediate_size": 12},
        "Granite-MoE-shared",
        "experts stored fused (3-D) solved row by row; routers solved; shared MLP solved",
    ),
    Architecture(
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridConfig",
        {
            **{**MOE, "intermediate_size": 8, "num_local_experts": 4, "shared_intermediate_size": 12},
            **{"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8},
            "mamba_chunk_size": 8,
        },
        "Granite-MoE-hybrid",
        "experts stored fused (3-D) solved row by row; routers solved; shared MLP and Mamba projections solved",
    ),
    Architecture(
        "HunYuanMoEV1ForCausalLM",
        "HunYuanMoEV1Config",
        {**MOE, "num_experts": 4, "moe_topk": 2, "head_dim": 4},
        "Hunyuan-MoE-V1",
        "experts one by one; the router's linear solved; top-k read from `moe_topk`",
    ),
    Architecture(
        "HYV3ForCausalLM",
        "HYV3Config",
        {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "head_dim": 4},
        "HY-V3",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "HYV4ForCausalLM",
        "HYV4Config",
        {**MOE, **ROUTED, **MLA, "head_dim": 4, "index_topk": 4, "index_head_dim": 4},
        "HY-V4",
        "experts stored fused (3-D) solved row by row; shared experts, low-rank attention and routers solved; "
        "hyper-connection tensors averaged (not linear layers)",
    ),
    Architecture(
        "InklingForCausalLM",
        "InklingTextConfig",
        {**MOE, "moe_intermediate_size": 8, "n_routed_experts": 4, "n_shared_experts": 1, "head_dim": 4}
        | {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_head_dim": 4, "unpadded_vocab_size": VOCAB},
        "Inkling",
        "experts stored fused (3-D) solved row by row; routers (with their shared-expert rows) solved; shared experts "
        "(3-D, scaled by router scores) averaged, and said",
    ),
    Architecture(
        "Inkling2ForCausalLM",
        "Inkling2TextConfig",
        INKLING2,
        "Inkling-2",
        "experts stored fused (3-D, interleaved) solved row by row; routers solved; checkpoint keys placed by "
        "transformers' own renaming rules",
    ),
    Architecture(
        "Inkling2LoopForCausalLM",
        "Inkling2LoopTextConfig",
        {**INKLING2, "loop_gate_rank": 4},
        "Inkling-2-Loop",
        "experts stored fused (3-D, interleaved) solved row by row; routers solved; checkpoint keys placed by "
        "transformers' own renaming rules",
    ),
    # attention layers only (attn_layer_period 1): Mamba's dt_proj is never called (its weight is read)
    Architecture(
        "JambaForCausalLM",
        "JambaConfig",
        {**MOE, "num_experts": 4, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 1}
        | {"attn_layer_offset": 0},
        "Jamba",
        "experts one by one; routers solved (tested on attention layers: a Mamba layer's dt_proj is read by weight, "
        "never called, so exclude it)",
    ),
    Architecture(
        "JetMoeForCausalLM",
        "JetMoeConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4, "kv_channels": 4},
        "JetMoE",
        "experts averaged, and said: JetMoeParallelExperts read rows sorted by expert, without token positions to "
        "leave padding out",
    ),
    Architecture(
        "KimiLinearForCausalLM",
        "KimiLinearConfig",
        {**MOE, **MLA, "moe_intermediate_size": 8, "num_experts": 4, "num_shared_experts": 1, "num_expert_group": 1}
        | {"topk_group": 1, "linear_head_dim": 4, "linear_num_heads": 4, "head_dim": 4},
        "Kimi-Linear",
        "experts one by one; shared experts, low-rank attention and routers solved; top-k read from "
        "`num_experts_per_token`",
    ),
    Architecture(
        "Kolibri1ForCausalLM",
        "Kolibri1Config",
        {
            **MOE,
            "moe_intermediate_size": 8,
            "num_local_experts": 4,
            "head_dim": 4,
            "shared_expert_intermediate_size": 8,
        },
        "Kolibri-1",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "LagunaForCausalLM",
        "LagunaConfig",
        {**MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "num_experts": 4, "head_dim": 4},
        "Laguna",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "Lfm2MoeForCausalLM",
        "Lfm2MoeConfig",
        {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "num_dense_layers": 1}
        | {"layer_types": ["conv", "full_attention"]},
        "LFM2-MoE",
        "experts one by one; routers solved; short convolution averaged (not a linear layer)",
    ),
    # transposed experts of non-square rows (2 x 12 != 16): the test tells their orientation by shape
    Architecture(
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        {**MOE, "intermediate_size": 12, "intermediate_size_mlp": 24, "num_local_experts": 4, "head_dim": 4},
        "Llama-4",
        "experts (3-D, transposed, each token scaled by its router score) solved row by row on the tokens routed to "
        "them; shared expert and routers solved",
    ),
    Architecture(
        "LaraMiniForCausalLM",
        "LaraMiniConfig",
        {**MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "num_experts": 4, "head_dim": 4}
        | {"linear_key_head_dim": 4, "linear_value_head_dim": 4}
        | {"linear_num_key_heads": 2, "linear_num_value_heads": 4},
        "Lara-mini",
        "experts stored fused (3-D) solved row by row; shared experts and routers solved; the checkpoint's "
        "linear_attn.in_proj, which transformers splits into four projections of one input, solved as one layer",
    ),
    Architecture(
        "LongcatFlashForCausalLM",
        "LongcatFlashConfig",
        {k: v for k, v in DECODER.items() if k not in ("num_hidden_layers", "intermediate_size")}
        | {"num_layers": 1, "num_key_value_heads": 4, "ffn_hidden_size": 24, "expert_ffn_hidden_size": 8}
        | {"n_routed_experts": 4, "moe_topk": 2, "zero_expert_num": 2, **MLA, "head_dim": 4},
        "LongCat-Flash",
        "experts one by one (the unused gate/up of its parameter-free zero experts averaged, and said); dense MLPs "
        "and low-rank attention solved; the router's classifier, applied by its parent with F.linear (never called "
        "as a module), averaged and said",
        never_run=1,
    ),
    Architecture(
        "MellumForCausalLM",
        "MellumConfig",
        {**MOE, "moe_intermediate_size": 8, "num_local_experts": 4, "head_dim": 4},
        "Mellum",
        "experts one by one; routers solved",
    ),
    Architecture(
        "MiMoV2FlashForCausalLM",
        "MiMoV2FlashConfig",
        {**MOE, **ROUTED, "num_key_value_heads": 2, "head_dim": 12, "v_head_dim": 4},
        "MiMo-V2-Flash",
        "experts one by one; routers solved",
    ),
    Architecture(
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4, "head_dim": 4, "block_size": 4},
        "MiniMax",
        "experts one by one; routers solved",
    ),
    Architecture(
        "MiniMaxM2ForCausalLM",
        "MiniMaxM2Config",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4, "head_dim": 4},
        "MiniMax-M2",
        "experts one by one; routers solved",
    ),
    Architecture(
        "MiniMaxM3VLForCausalLM",
        "MiniMaxM3VLTextConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4, "head_dim": 4, "dense_intermediate_size": 24}
        | {"shared_intermediate_size": 8, "index_head_dim": 4, "index_block_size": 4, "index_topk_blocks": 2},
        "MiniMax-M3",
        "experts stored fused (3-D) solved row by row; shared experts and routers solved",
    ),
    Architecture(
        "Mistral4ForCausalLM",
        "Mistral4Config",
        {**MOE, **ROUTED, **MLA, "head_dim": 4},
        "Mistral-4",
        "experts stored fused (3-D) solved row by row; shared experts, low-rank attention and routers solved",
    ),
    Architecture(
        "NemotronHForCausalLM",
        "NemotronHConfig",
        {
            **{**MOE, "moe_intermediate_size": 8, "moe_shared_expert_intermediate_size": 8, "n_routed_experts": 4},
            **{"head_dim": 4, "mamba_num_heads": 4, "mamba_head_dim": 4, "ssm_state_size": 8, "n_groups": 1},
            **{"chunk_size": 8, "use_mamba_kernels": False, "layers_block_type": ["mamba", "moe"]},
        },
        "Nemotron-H",
        "experts (ungated: up, down) one by one; shared expert and routers solved",
    ),
    Architecture(
        "PhimoeForCausalLM",
        "PhimoeConfig",
        {**MOE, "intermediate_size": 8, "num_local_experts": 4},
        "Phi-MoE",
        "experts one by one; routers solved",
    ),
    Architecture(
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeTextConfig",
        {
            **MOE,
            "vocab_size": VOCAB + 8,
            "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 8,
            "num_experts": 4,
            "head_dim": 4,
        }
        | {
            "linear_key_head_dim": 4,
            "linear_value_head_dim": 4,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
        "Qwen3.5-MoE",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        {**MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "num_experts": 4, "head_dim": 4}
        | {
            "linear_key_head_dim": 4,
            "linear_value_head_dim": 4,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
        "Qwen3-Next",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "Qwen4ExpForCausalLM",
        "Qwen4ExpTextConfig",
        {**MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "num_experts": 4, "head_dim": 4}
        | {"linear_key_head_dim": 4, "linear_value_head_dim": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4}
        | {"hc_lowrank": 4},
        "Qwen4-Exp",
        "experts one by one; shared experts and routers solved",
    ),
    Architecture(
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeConfig",
        {
            "text_config": {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "head_dim": 4}
            | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 0]}},
            "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2}
            | {"out_hidden_size": 16, "patch_size": 4, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        }
        | {"image_token_id": VOCAB - 1, "video_token_id": VOCAB - 2, "vision_start_token_id": VOCAB - 3},
        "Qwen3-VL-MoE",
        "measured on text: experts stored fused (3-D) solved row by row, routers solved; the vision tower's 8 linear "
        "layers never run on text: averaged, and said",
        never_run=8,
    ),
    Architecture(
        "SolarOpenForCausalLM",
        "SolarOpenConfig",
        {**MOE, **ROUTED, "head_dim": 4},
        "Solar-Open",
        "experts one by one; shared experts and routers solved",
    ),
    # initializer_range 0.2: routing by the token (at 0.02 the router's biases send every token to one expert)
    Architecture(
        "ZayaForCausalLM",
        "ZayaConfig",
        {**MOE, "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 1, "head_dim": 4}
        | {"router_hidden_size": 8, "initializer_range": 0.2},
        "ZAYA",
        "experts stored fused (3-D) solved row by row (top-1; one a model routed no token to averaged, and said); "
        "router MLP solved",
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
