"""Diagonal Fisher information per parameter, for the Fisher-weighted averaging baseline.

F = (1/N) sum_n E_{y ~ p_model(.|x_n)} [ (d log p_model(y | x_n) / d theta)^2 ]

from per-example gradients of the model's own log-likelihood (never the batch-mean loss, never the gold labels):
exact over the classes for sequence classification, one sampled tag sequence per example for token classification.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import Progress

from regmean import distributed
from regmean.architecture import load_config, model_class
from regmean.devices import check_device
from regmean.errors import RegmeanError
from regmean.heads import head_kind
from regmean.io.data import load_examples
from regmean.io.labelled import IGNORE, TextDataset, batches
from regmean.loading import check_positions, load_tokenizer
from regmean.scoring import load_classifier


def measure_fisher(
    model_dir: str | Path, data: TextDataset, max_length: int = 64, seed: int = 0, device: str = "cpu"
) -> dict:
    """Per-parameter Fisher over `data` (labels unused), on CPU tensors. In a torch.distributed job each rank takes
    its shard and rank 0's result covers all examples."""
    check_device(device)
    model = load_classifier(model_dir, data.token_level).to(device)
    tok = load_tokenizer(model_dir)
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator(device=device).manual_seed(seed + distributed.rank())
    local = data.subset(distributed.shard(range(len(data))))
    with Progress(transient=True, disable=distributed.rank() != 0) as bar:
        task = bar.add_task("fisher", total=len(local))
        for batch in batches(tok, local, 1, max_length):
            check_positions(model.config, batch["input_ids"].shape[-1])
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logp = model(**batch).logits.float().log_softmax(-1)
            if data.token_level:
                keep = labels[0] != IGNORE
                sampled = torch.multinomial(logp[0, keep].exp(), 1, generator=gen).squeeze(1)
                terms = [(logp[0, keep].gather(1, sampled[:, None]).sum(), 1.0)]
            else:
                probs = logp[0].exp().detach()
                terms = [(logp[0, c], float(probs[c])) for c in range(logp.shape[-1])]
            for j, (value, weight) in enumerate(terms):
                grads = torch.autograd.grad(
                    value, list(params.values()), retain_graph=j < len(terms) - 1, allow_unused=True
                )
                for (name, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        fisher[name].add_(g.detach() ** 2, alpha=weight)
            bar.advance(task)
    for f in fisher.values():  # one parameter at a time into rank 0
        distributed.sum_to_rank0(f)
    return {n: (f / len(data)).cpu() for n, f in fisher.items()}


def unlabelled_data(model_dir: Path, data: Path, text_field: str, max_examples: int | None) -> TextDataset:
    """The texts of `data` as the classifier in `model_dir` reads them (word lists for a token classifier), under
    placeholder labels: the Fisher samples the model's own. A model that is not a classifier is refused."""
    config = load_config(model_dir)
    name = model_class(config, model_dir).__name__  # a transformers model class, not just a name
    kind = head_kind(name)
    scored_as = kind.scored_as if kind is not None else None
    if scored_as not in ("sequence", "token"):
        raise RegmeanError(
            f"{model_dir}: {name} is not a classifier; the Fisher needs a fine-tuned "
            "...ForSequenceClassification or ...ForTokenClassification model"
        )
    token_level = scored_as == "token"
    texts = [e.text for e in load_examples(data, text_field=text_field, max_examples=max_examples)]
    texts = [t.split() for t in texts] if token_level else texts
    labels = [[0] * len(t) for t in texts] if token_level else [0] * len(texts)
    names = [config.id2label[i] for i in range(config.num_labels)]
    return TextDataset(data.stem, texts, labels, names, token_level=token_level)
