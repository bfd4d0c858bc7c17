"""Loading a model folder for a forward pass (measure, fisher): the tokenizer, and the model with every tensor its
architecture needs (transformers would initialise a missing one at random and carry on)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from regmean.architecture import load_config, model_class, quiet_transformers
from regmean.errors import RegmeanError, one_line

# files that carry a vocabulary; without one, transformers builds a tokenizer that maps every word to [UNK]
VOCABULARY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.*",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
)
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, cls=None):
    """The model in eval mode on `device` (class `cls`, or the one config.json names; in `dtype`, or as saved),
    refused when the checkpoint lacks a tensor the class needs or holds one of another shape."""
    cls = cls or model_class(load_config(model_dir), model_dir)
    transformers.utils.logging.disable_progress_bar()
    try:
        with quiet_transformers():  # mismatched sizes are reported below, by name and shape
            model, info = cls.from_pretrained(
                str(model_dir),
                dtype=dtype or "auto",
                trust_remote_code=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except Exception as exc:  # transformers raises many types for checkpoints it cannot use
        raise RegmeanError(f"{model_dir}: cannot load model ({one_line(str(exc), 300)})") from exc
    mismatched = list(info.get("mismatched_keys", []))
    if mismatched:
        key, stored, wanted = min(mismatched, key=lambda entry: str(entry[0]))[:3]
        raise RegmeanError(
            f"{model_dir}: tensor {key} is {list(stored)} in the checkpoint but config.json makes it {list(wanted)} "
            f"({len(mismatched)} such tensors: num_labels/id2label for a head's rows, vocab_size for an embedding's); "
            "make config.json match the weights"
        )
    absent = list(info.get("missing_keys", []))
    if absent:
        raise RegmeanError(
            f"{model_dir}: the checkpoint lacks {len(absent)} tensors {cls.__name__} needs, e.g. {absent[0]}; "
            "transformers would initialise them at random. Use the matching model folder"
        )
    return model.to(device).eval()


def load_adapted(ckpt, device: str = "cpu", dtype: torch.dtype | None = None, cls=None):
    """The model a Checkpoint or AdaptedCheckpoint holds, in eval mode: for a LoRA adapter, the base model with the
    adapted weights (W + scale B A, and the modules it saves) as the adapter's checkpoint computes them for a merge,
    so that measure and merge see one function. peft is not involved: its module matching runs the adapter's
    patterns through an unbounded regular-expression engine."""
    from regmean.io.adapter import AdaptedCheckpoint

    if not isinstance(ckpt, AdaptedCheckpoint):
        return load_model(ckpt.path, device, dtype, cls)
    model = load_model(ckpt.base.path, device, dtype, cls)
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    adapted = [*ckpt.pairs, *ckpt.replaced]
    unknown = [key for key in adapted if key not in tensors]
    if unknown:
        raise RegmeanError(
            f"{ckpt.path}: adapts {unknown[0]}, which the loaded {type(model).__name__} names otherwise; merge the "
            "adapter into its model first (peft's merge_and_unload) and give that folder"
        )
    with torch.no_grad():
        for key in adapted:
            tensors[key].copy_(ckpt.get(key).to(device=tensors[key].device, dtype=tensors[key].dtype))
    return model


def has_vocabulary(folder: str | Path) -> bool:
    return any(any(Path(folder).glob(pattern)) for pattern in VOCABULARY_FILES)


def tokenizer_folder(folders: Sequence[Path]) -> Path:
    """The last of a model's folders that holds a vocabulary: an adapter's own tokenizer (saved with its added
    tokens) before its base model's."""
    with_vocabulary = [f for f in folders if has_vocabulary(f)]
    return with_vocabulary[-1] if with_vocabulary else folders[-1]


def load_tokenizer(model_dir: str | Path):
    if not has_vocabulary(model_dir):
        raise RegmeanError(
            f"{model_dir}: no tokenizer vocabulary ({', '.join(VOCABULARY_FILES)}); "
            "save the tokenizer into the folder (tokenizer.save_pretrained)"
        )
    try:
        with quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # tokenizers and transformers raise many types for files they cannot use
        raise RegmeanError(
            f"{model_dir}: no usable tokenizer files ({one_line(str(exc), 300)}); copy the tokenizer into the folder"
        ) from exc
    tok.padding_side = "right"  # right padding keeps positions and causal attention of real tokens unchanged
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise RegmeanError(f"{model_dir}: tokenizer has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def check_positions(config: transformers.PretrainedConfig, tokens: int) -> None:
    """Refuse inputs longer than the positions config.json declares (position embeddings would index past their
    table): called on each batch, so a --max-length that no text reaches costs nothing."""
    limits = [getattr(config, k) for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)]
    if limits and tokens > min(limits):
        model = getattr(config, "_name_or_path", "") or "the model"
        raise RegmeanError(
            f"{model}/config.json: declares {min(limits)} positions, and inputs reach {tokens} tokens; "
            f"use a max length of {min(limits)} or less (measure and evaluate: --max-length; a merge recipe's data: "
            "max_length)"
        )


def check_vocabulary_fits(model: torch.nn.Module, tokenizer, where: str | Path) -> None:
    """Refuse a tokenizer that can give ids past the model's embedding rows (tokens added but the embeddings not
    resized), before any work: the forward pass would fail on the first such token with an index error."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    ids = max(tokenizer.get_vocab().values(), default=-1) + 1
    if ids > rows:
        raise RegmeanError(
            f"{where}: the tokenizer has ids up to {ids - 1}, the model's embedding {rows} rows; resize the "
            "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save both again"
        )


def check_room_for_text(tokenizer, max_length: int, where: str | Path) -> None:
    """Refuse a max length the tokenizer's own special tokens fill: it would then not truncate at all."""
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= specials:
        raise RegmeanError(
            f"{where}: --max-length {max_length} leaves no room for text after the tokenizer's {specials} special "
            f"tokens; give at least {specials + 1}"
        )


CHARS_PER_TOKEN = 16
"""A first guess of characters per token for `bounded_text`'s prefix (grown 4-fold while it gives too few)."""
TOKEN_MARGIN = 16
"""Tokens past `max_length` a prefix must give: a cut changes only the tokens of the word it falls in."""
MAX_CHARS_PER_TOKEN = 1024
"""A row is read up to max_length x this many characters: beyond, only text that tokenises to almost nothing (one
unknown token for a 60M-character word) could still be reached, and tokenising it costs minutes and gigabytes."""


def bounded_text(tokenizer, text: str, max_length: int) -> str:
    """The shortest prefix of `text` (suffix, for a tokenizer that truncates on the left) that tokenises to more
    than `max_length` + `TOKEN_MARGIN` tokens, or all of it: truncated to `max_length`, it gives the same tokens as
    the whole text, while a 50 MB line is never tokenised whole; never more than max_length x
    `MAX_CHARS_PER_TOKEN` characters."""
    limit, cap = max(max_length, 1) * CHARS_PER_TOKEN, max(max_length, 1) * MAX_CHARS_PER_TOKEN
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    text = text[-cap:] if left else text[:cap]
    while limit < len(text):
        part = text[-limit:] if left else text[:limit]
        if len(tokenizer(part, add_special_tokens=False)["input_ids"]) > max_length + TOKEN_MARGIN:
            return part
        limit *= 4
    return text
