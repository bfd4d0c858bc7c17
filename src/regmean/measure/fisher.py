"""The diagonal Fisher statistic, for the Fisher-weighted averaging baseline (`method: fisher`): measured by
`regmean fisher`, written as `{parameter}::fisher` tensors in safetensors with the same metadata as Gram statistics
(format regmean.fisher), read lazily by merges (`FisherFile`).

F = (1/N) sum_n E_{y ~ p_model(.|x_n)} [ (d log p_model(y | x_n) / d theta)^2 ]

from per-example gradients of the model's own log-likelihood (never the batch-mean loss, never the gold labels):
exact over the classes for sequence classification, one sampled tag sequence per example for token classification.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import Progress

from regmean import __version__, distributed
from regmean.architecture import load_config, model_class
from regmean.cli_common import PICKLE_HELP, console, on_rank0
from regmean.devices import check_device
from regmean.dtypes import STORED
from regmean.errors import RegmeanError
from regmean.heads import head_kind
from regmean.io.checkpoint import Checkpoint
from regmean.io.data import load_examples
from regmean.io.labelled import IGNORE, TextDataset, batches
from regmean.io.staged import StagedFiles, replaceable_target, target_file, write_atomic
from regmean.launch import relaunch_with_torchrun
from regmean.loading import check_positions, load_tokenizer
from regmean.scoring import load_classifier
from regmean.statistic import ProvenanceRecord, Statistic
from regmean.stats import open_statistics
from regmean.stats_checks import MAX_LENGTH

FORMAT = "regmean.fisher"
FILE_NAME = "fisher.safetensors"
NORMALISATION = "mean over examples of the expected squared score under the model's own predictive distribution"


def fisher_file(
    fisher: dict[str, torch.Tensor], fingerprint: dict[str, str], examples: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a Fisher statistics file."""
    metadata = {
        "format": FORMAT,
        "format_version": "1",
        "library": f"regmean {__version__}",
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "examples": str(examples),
        "normalisation": NORMALISATION,
    }
    return {f"{n}::fisher": f.contiguous() for n, f in fisher.items()}, metadata


def save_fisher(fisher: dict[str, torch.Tensor], model_dir: str | Path, out: str | Path, examples: int) -> Path:
    tensors, metadata = fisher_file(fisher, Checkpoint(model_dir).fingerprint, examples)
    return write_atomic(tensors, metadata, replaceable_target(Path(out), FILE_NAME, FORMAT))


class FisherFile:
    """A Fisher statistics file opened lazily (header checked at open): one parameter's Fisher when asked."""

    def __init__(self, path: str | Path):
        self.path = target_file(Path(path), FILE_NAME)
        self._handle, meta = open_statistics(self.path, FORMAT, "Fisher statistics")
        self.fingerprint = meta.fingerprint()
        self.examples = meta.natural("examples")
        self.nbytes = self.path.stat().st_size
        self.provenance: list[ProvenanceRecord] = []  # Fisher files record no measuring runs
        self.keys: dict[str, str] = {}  # parameter -> its tensor in the file
        for key in self._handle.keys():
            name, sep, kind = key.rpartition("::")
            if not sep or kind != "fisher" or not STORED[self._handle.dtype(key)].is_floating_point:
                raise RegmeanError(f"{self.path}: entry {key!r} is not a floating {{parameter}}::fisher tensor")
            self.keys[name] = key

    def describe(self) -> str:
        return f"{self.examples} examples (Fisher)"

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handle.shape(self.keys[key])

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if key not in self.keys:
            return None
        f = self._handle.get(self.keys[key], rows)
        if not torch.isfinite(f).all() or bool((f < 0).any()):
            raise RegmeanError(f"{self.path}: Fisher of {key} has NaN, Inf or negative values; measure again")
        return f


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


def fisher(
    model_dir: Annotated[Path, typer.Argument(help="Fine-tuned classifier folder (sequence or token classification)")],
    data: Annotated[Path, typer.Option(help="Local data file: .jsonl, .json, .csv, .tsv or .parquet")],
    out: Annotated[Path, typer.Option(help="Folder to write fisher.safetensors into")],
    text_field: Annotated[str, typer.Option(help="Column holding the text (words split on spaces for NER)")] = "text",
    max_examples: Annotated[int | None, typer.Option(min=1, help="Use at most this many examples")] = None,
    max_length: Annotated[int, typer.Option(min=1, max=MAX_LENGTH)] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the sampled tags (token classification)")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
    nproc: Annotated[int, typer.Option(min=1, help="Processes on this machine (runs torchrun for you)")] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing Fisher file (kept until the new one is complete)")
    ] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=PICKLE_HELP)] = False,
) -> None:
    """Measure the diagonal Fisher of a classifier (for `method: fisher`), from per-example gradients."""
    if nproc > 1 and not distributed.launched():
        relaunch_with_torchrun(nproc, data=data)
    device = distributed.init_from_env(device)
    sources = [("model", model_dir), ("data file", data)]
    writing = on_rank0(
        lambda: StagedFiles(out, fmt=FORMAT, file_name=FILE_NAME, replace=force, inputs=sources, log=console.print)
    )
    with writing as writer:
        checkpoint = Checkpoint(model_dir, allow_pickle)
        dataset = unlabelled_data(model_dir, data, text_field, max_examples)
        fingerprint = checkpoint.fingerprint  # reads every weight: NaN or Inf is refused before the work
        values = measure_fisher(model_dir, dataset, max_length, seed, device)
        if writer is None:
            return
        writer.stage(*fisher_file(values, fingerprint, len(dataset)))
        (path,) = writer.commit()
    console.print(f"wrote {path}: Fisher of {len(values)} parameters over {len(dataset)} examples")


FISHER = Statistic("fisher", FisherFile, "regmean.measure.fisher:fisher")
