"""`regmean evaluate MODEL... --data FILE`: any number of model folders (a merge and its inputs, say) scored side by
side on a local labelled file, with the scoring the bench suites use (`regmean.scoring`).

- sequence classification: accuracy and macro-F1 (and each label's F1 on request);
- token classification: entity F1 (exact entities, CoNLL chunking) over word-level tags;
- causal or sequence-to-sequence LMs: perplexity, token-weighted, padding masked.

Labels are matched by name: each model's `id2label` against the names in the data file, so models whose heads
order the labels differently are scored alike; a model whose labels differ from the others' is refused, named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from regmean.architecture import load_config
from regmean.errors import RegmeanError, check_flag, check_text, check_whole_number
from regmean.heads import head_kind
from regmean.io.chat import render_chat
from regmean.io.data import Example, load_examples
from regmean.io.labelled import TextDataset, read_labelled
from regmean.scoring import classifier_class, classify, per_label_f1, score


@dataclass
class Scores:
    model: str
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    tokens: int | None = None
    """Language models: the tokens scored (each model's own tokenizer counts them)."""


@dataclass(frozen=True)
class Run:
    """Where and how the models are run: device, batch size and the longest input in tokens."""

    device: str
    batch_size: int
    max_length: int


@dataclass
class Candidate:
    """A model to score, as given: a model folder, or a LoRA adapter over its base (config and head from the
    base, tokenizer from the adapter where it saved one)."""

    path: Path
    checkpoint: object  # io.checkpoint.Checkpoint or io.adapter.AdaptedCheckpoint

    @classmethod
    def open(cls, path: Path, base: Path | None, bases: dict) -> Candidate:
        from regmean.io.adapter import is_adapter, open_model

        return cls(path, open_model(path, base if is_adapter(path) else None, bases=bases))

    @property
    def config_dir(self) -> Path:
        return self.checkpoint.folders[0]

    def load(self, device: str, cls=None):
        from regmean.loading import load_adapted

        return load_adapted(self.checkpoint, device, cls=cls)

    def tokenizer(self):
        from regmean.loading import load_tokenizer, tokenizer_folder

        return load_tokenizer(tokenizer_folder(self.checkpoint.folders))


def model_kind(path: Path) -> str:
    """sequence, token, causal or seq2seq, from the architecture config.json names."""
    arch = (load_config(path).architectures or ["?"])[0]
    kind = head_kind(arch)
    if kind is None or kind.scored_as is None:
        raise RegmeanError(f"{path}: architecture {arch} is not a classifier or a language model regmean can score")
    return kind.scored_as


def label_names(path: Path) -> list[str]:
    """The model's label names in its own id order; refused when two ids share a name (scoring matches by name)."""
    id2label = load_config(path).id2label or {}
    ids = sorted(int(k) for k in id2label)
    if ids != list(range(len(ids))):
        raise RegmeanError(
            f"{path / 'config.json'}: id2label ids {ids[:8]} are not 0 to {len(ids) - 1}, one per output of the head; "
            "fix id2label"
        )
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RegmeanError(
            f"{path / 'config.json'}: id2label names {twice[0]!r} for {names.count(twice[0])} ids; evaluate matches "
            "labels by name: give each id its own name"
        )
    return names


def check_labels(configs: list[Path], models: list[Path], data: TextDataset, data_path: Path) -> list[str]:
    """The label names every model shares (the data's first, in order), refusing models whose sets differ from the
    first model's and data labels no model has; `configs`: each model's config folder (an adapter's base)."""
    sets = {m: label_names(c) for c, m in zip(configs, models, strict=True)}
    first = set(sets[models[0]])
    for m in models[1:]:
        if set(sets[m]) != first:
            raise RegmeanError(
                f"{m}: labels {sorted(sets[m])} differ from {models[0]}'s {sorted(first)}; score them separately"
            )
    unknown = sorted(set(data.label_names) - first)
    if unknown:
        raise RegmeanError(f"{data_path}: labels {unknown} are not among the models' {sorted(first)}")
    return data.label_names + sorted(first - set(data.label_names))


def classification_scores(
    candidate: Candidate, data: TextDataset, names: list[str], per_label: bool, run: Run
) -> dict[str, float]:
    """The bench's scores for one classifier, its logits reordered to `names` (the model's labels by name)."""
    own = label_names(candidate.config_dir)
    order = torch.tensor([own.index(n) for n in names])
    model = candidate.load(run.device, cls=classifier_class(data.token_level))
    predicted = classify(model, candidate.tokenizer(), candidate.path, data, run.max_length, run.batch_size, run.device)
    logits = [lg[..., order] for lg in predicted]
    broken = sum(not bool(torch.isfinite(lg).all()) for lg in logits)
    if broken:
        raise RegmeanError(
            f"{candidate.path}: gives NaN or Inf logits on {broken} of {len(logits)} examples; its weights are broken"
        )
    named = TextDataset(data.name, data.texts, data.labels, names, token_level=data.token_level)
    metrics = score(named, logits)
    if per_label and not data.token_level:
        predicted = [int(lg.argmax()) for lg in logits]
        metrics |= {f"f1[{n}]": f for n, f in per_label_f1(data.labels, predicted, names).items()}
    return metrics


def perplexity(candidate: Candidate, kind: str, examples: list[Example], scope: str, run: Run) -> tuple[float, int]:
    """exp of the mean negative log-likelihood per predicted token over the data (padding masked), and the tokens
    scored; seq2seq models score the targets given the texts; conversations are formatted by each model's own chat
    template and, with `scope` "assistant", only the assistant turns' tokens are scored."""
    from regmean.loading import check_positions, check_room_for_text, check_vocabulary_fits

    device, batch_size, max_length = run.device, run.batch_size, run.max_length
    model, tok = candidate.load(device), candidate.tokenizer()  # (pad token set, right padding)
    check_vocabulary_fits(model, tok, candidate.path)
    check_room_for_text(tok, max_length, candidate.path)
    examples, _ = render_chat(examples, tok, candidate.path)
    spans = _scored_spans(examples, tok, candidate.path, scope)
    special = not (examples and examples[0].templated)  # a chat template writes its own special tokens
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            own = None if spans is None else spans[start : start + batch_size]
            enc = _encoded(tok, [e.text for e in batch], max_length, device, special=special, spans=own)
            check_positions(model.config, enc["input_ids"].shape[-1])
            if kind == "seq2seq":
                lab = _encoded(tok, [e.target for e in batch], max_length, device, target=True)
                labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
                logits = model(**_inputs(enc), labels=labels).logits
            else:
                labels = enc["input_ids"].masked_fill(enc["scored"] == 0, -100)
                logits, labels = model(**_inputs(enc)).logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total, tokens = total + float(nll), tokens + int((labels != -100).sum())
    if tokens == 0:
        raise RegmeanError(f"{candidate.path}: no token to score (the texts are empty after tokenisation)")
    mean = total / tokens
    return (math.exp(mean) if mean < 700 else math.inf), tokens  # a broken model scores inf, not an overflow


def _scored_spans(examples: list[Example], tok, where: Path, scope: str) -> list | None:
    """Per example, the character spans whose tokens are scored (its assistant turns), or None: every token."""
    from regmean.io.chat import assistant_spans

    if scope != "assistant" or not any(e.templated for e in examples):
        return None
    if not tok.is_fast:
        raise RegmeanError(f"{where}: a slow tokenizer cannot locate the assistant turns' tokens; --score all")
    return [assistant_spans(e, tok, where, number) for number, e in enumerate(examples, start=1)]


def _inputs(enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _encoded(
    tok, texts: list[str], max_length: int, device: str, target: bool = False, special: bool = True, spans=None
) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and which tokens are scored (`scored`: every real token, or with `spans` the
    tokens that begin inside each text's spans); no token_type_ids (a tokenizer's would be added to a GPT-2's
    embeddings). `target`: encoded as targets (tokenizers with a target vocabulary use it)."""
    from regmean.loading import bounded_text

    texts = [bounded_text(tok, t, max_length) for t in texts]
    kwargs = {"text_target": texts} if target else {"text": texts}
    enc = tok(
        **kwargs,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        add_special_tokens=special,
        return_offsets_mapping=spans is not None,
    )
    scored = enc["attention_mask"].clone()
    if spans is not None:
        starts = enc["offset_mapping"][..., 0]
        for row, text_spans in enumerate(spans):
            inside = torch.zeros_like(scored[row], dtype=torch.bool)
            for first, last in text_spans:
                inside |= (starts[row] >= first) & (starts[row] < last)
            scored[row] &= inside.to(scored.dtype)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "scored": scored}
    return {k: v.to(device) for k, v in out.items()}


def evaluate(
    models: list[str | Path] | str | Path,
    data: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    target_field: str | None = None,
    per_label: bool = False,
    device: str = "cpu",
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = True,
    messages_field: str | None = None,
    base: Path | None = None,
    score_tokens: str = "assistant",
) -> list[Scores]:
    """Every model's scores on the data file, in the order given (all models must be of one kind). Model folders
    or LoRA adapters (over `base`, or the local base their config names); conversations score the assistant turns
    only unless `score_tokens` is "all"."""
    models, data = _check_arguments(models, data, batch_size, max_length)
    _check_switches(per_label, progress, device)
    bases: dict = {}  # adapters over one base share it
    candidates = [Candidate.open(m, base, bases) for m in models]
    kinds = {c.path: model_kind(c.config_dir) for c in candidates}
    kind = kinds[models[0]]
    other = next((m for m in models if kinds[m] != kind), None)
    if other is not None:
        raise RegmeanError(f"{other}: a {kinds[other]} model, {models[0]} is a {kind} one; score them separately")
    run = Run(device, batch_size, max_length)
    out = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(models))
        if kind in ("sequence", "token"):
            labelled = read_labelled(data, kind == "token", text_field, label_field)
            names = check_labels([c.config_dir for c in candidates], models, labelled, data)
            for c in candidates:
                metrics = classification_scores(c, labelled, names, per_label, run)
                out.append(Scores(str(c.path), kind, metrics, len(labelled.texts)))
                bar.advance(task)
        else:
            examples = _lm_examples(data, kind, text_field, target_field, messages_field)
            for c in candidates:
                value, tokens = perplexity(c, kind, examples, score_tokens, run)
                out.append(Scores(str(c.path), kind, {"perplexity": value}, len(examples), tokens))
                bar.advance(task)
    return out


def _check_arguments(models, data, batch_size, max_length) -> tuple[list[Path], Path]:
    """The Python API's arguments of the right kinds (the command line builds them itself): models and data as paths."""
    models = [models] if isinstance(models, str | Path) else models
    if not isinstance(models, Sequence) or not all(isinstance(m, str | Path) for m in models):
        raise RegmeanError("evaluate: models are a list of model (or adapter) folders, as paths")
    if not models:
        raise RegmeanError("evaluate: no models given; pass a list of model (or adapter) folders")
    if not isinstance(data, str | Path):
        raise RegmeanError(
            f"evaluate: data is the path of a labelled data file (JSONL, CSV or Parquet), not {type(data).__name__}"
        )
    check_whole_number(batch_size, "batch_size", "examples")
    check_whole_number(max_length, "max_length", "tokens")
    return [Path(m) for m in models], Path(data)


def _check_switches(per_label, progress, device) -> None:
    check_flag(per_label, "per_label")
    check_flag(progress, "progress")
    check_text(device, "device")


def _lm_examples(
    path: Path, kind: str, text_field: str, target_field: str | None, messages_field: str | None
) -> list[Example]:
    if kind == "seq2seq" and target_field is None:
        raise RegmeanError(f"{path}: a sequence-to-sequence model scores targets: give --target-field")
    if messages_field and kind != "causal":
        raise RegmeanError(f"{path}: --messages-field scores causal LMs; a {kind} model reads --text-field")
    if messages_field:
        return load_examples(path, messages_field=messages_field)
    examples = load_examples(path, text_field, target_field=target_field if kind == "seq2seq" else None)
    if kind == "seq2seq":
        examples = [e for e in examples if e.target is not None]  # rows without a target score nothing
        if not examples:
            raise RegmeanError(f"{path}: no rows with both {text_field!r} and {target_field!r}")
    return examples
