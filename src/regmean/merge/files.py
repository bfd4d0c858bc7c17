"""The names of the files in a merged model folder (written by `output`, recognised by `staging`)."""

from regmean.io.adapter import ADAPTER_WEIGHTS
from regmean.io.checkpoint import ADAPTER_CONFIG, SAFETENSORS_INDEX

COPIED_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
)
"""Config, generation settings and every tokenizer file format transformers writes: copied from the first model."""
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", SAFETENSORS_INDEX, ADAPTER_WEIGHTS, ADAPTER_CONFIG)
"""The weights of a model folder, or of an adapter folder (`output.lora`)."""
CARD, RECIPE, REPORT = "README.md", "merge_config.yaml", "merge_report.json"
"""The model card, the resolved recipe, and the report (which lists every file of the folder)."""
STAGING_MARK = ".regmean-staging"
"""Marks a folder regmean is writing (or was, when a run was killed)."""
FAILED_MARK = ".regmean-failed-rank"
"""Left in the staging folder by a process of the merge that stopped on an error (not an interruption), followed by
its rank: the folder is then not kept for a rerun, which would fail the same way."""
