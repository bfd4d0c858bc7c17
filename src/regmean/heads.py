"""What a model class's head does, read from the end of its name: the one table that `evaluate` (how to score it),
the model card (the Hub's pipeline tag) and adapter outputs (peft's task type) share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadKind:
    scored_as: str | None
    """How `evaluate` scores it: sequence, token, causal or seq2seq (None: it does not)."""
    pipeline: str
    """The Hub's pipeline tag."""
    peft_task: str | None
    """peft's task type (the PeftModel subclass an adapter over it loads as)."""


HEAD_KINDS = {
    "ForSequenceClassification": HeadKind("sequence", "text-classification", "SEQ_CLS"),
    "ForTokenClassification": HeadKind("token", "token-classification", "TOKEN_CLS"),
    "ForCausalLM": HeadKind("causal", "text-generation", "CAUSAL_LM"),
    "LMHeadModel": HeadKind("causal", "text-generation", "CAUSAL_LM"),
    "ForConditionalGeneration": HeadKind("seq2seq", "text2text-generation", "SEQ_2_SEQ_LM"),
    "ForQuestionAnswering": HeadKind(None, "question-answering", "QUESTION_ANS"),
    "ForMaskedLM": HeadKind(None, "fill-mask", None),
}


def head_kind(architecture: str) -> HeadKind | None:
    """The kind of a model class by name (e.g. LlamaForCausalLM), or None for a class without a known head."""
    return next((kind for suffix, kind in HEAD_KINDS.items() if architecture.endswith(suffix)), None)
