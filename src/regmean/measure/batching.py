"""Batches for measuring: tokenised examples with one padding mask per stream, and the forward pass over them."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from regmean.errors import RegmeanError, one_line
from regmean.io.data import Example
from regmean.loading import bounded_text, check_positions
from regmean.stats_checks import Stream


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    masks: dict[Stream, torch.Tensor]  # stream -> [B, T] bool
    size: int
    _rows: dict[Stream, torch.Tensor | None] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Unpadded input tokens."""
        return int(self.masks[Stream.INPUT].sum())

    def stream_rows(self) -> dict[Stream, int]:
        """Real (unpadded) rows of every stream: tokens of the input and decoder, and the examples."""
        return {stream: int(mask.sum()) for stream, mask in self.masks.items()} | {Stream.EXAMPLE: self.size}

    def rows(self, stream: Stream) -> torch.Tensor | None:
        """Indices of the stream's real (unpadded) rows, computed once per batch; None when nothing is padding."""
        if stream not in self._rows:
            flat = self.masks[stream].reshape(-1)
            self._rows[stream] = None if bool(flat.all()) else flat.nonzero().squeeze(1)
        return self._rows[stream]


def make_batches(
    examples: Sequence[Example], tokenizer, model: nn.Module, batch_size: int, max_length: int, device: str
) -> Iterator[Batch]:
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    seq2seq_lm = encdec and hasattr(model, "prepare_decoder_input_ids_from_labels")  # feeds targets to its decoder
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pairs = None
        if chunk[0].text_pair is not None:
            pairs = [bounded_text(tokenizer, e.text_pair, max_length) for e in chunk]
        enc = tokenizer(
            [bounded_text(tokenizer, e.text, max_length) for e in chunk],
            pairs,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            add_special_tokens=not chunk[0].templated,  # a chat template writes its own
        )
        check_positions(model.config, enc["input_ids"].shape[-1])
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if "token_type_ids" in inputs and "token_type_ids" not in forward_args(model):
            del inputs["token_type_ids"]
        mask = inputs["attention_mask"].bool()
        masks = {Stream.INPUT: mask}
        if encdec:
            if seq2seq_lm:
                if any(e.target is None for e in chunk):
                    raise RegmeanError(
                        f"{type(model).__name__} is an encoder-decoder LM: every example needs a decoder target "
                        "(measure: --target-field; a merge recipe's data: target_field)"
                    )
                tgt = tokenizer(
                    text_target=[bounded_text(tokenizer, e.target, max_length) for e in chunk],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                labels = tgt["input_ids"].to(device)
                inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
                inputs["decoder_attention_mask"] = tgt["attention_mask"].to(device)
                masks[Stream.DECODER] = inputs["decoder_attention_mask"].bool()
            else:
                # Sequence classification: the model feeds the decoder its input shifted right; decoder position t
                # exists in the unpadded example exactly when encoder position t does.
                masks[Stream.DECODER] = mask
        yield Batch(inputs, masks, len(chunk))


def forward_args(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def forward(model: nn.Module, batch: Batch) -> None:
    kwargs = dict(batch.inputs)
    if "use_cache" in forward_args(model):
        kwargs["use_cache"] = False
    try:
        model(**kwargs)
    except (IndexError, RuntimeError, ValueError) as exc:  # torch and transformers' own failures on these inputs
        tokens = batch.inputs["input_ids"].shape[-1]
        raise RegmeanError(
            f"{type(model).__name__} failed on a batch of {tokens}-token inputs ({one_line(str(exc), 200)}); "
            "if the inputs are longer than the model accepts, lower --max-length"
        ) from exc
