"""Grown vocabularies: models whose embedding and LM-head rows differ because tokens were added to their tokenizers.

Rows of the tokens every model has merge as usual; a row only some models have is their weighted average (or the
row of the model `tokenizer_source:` names, where it has one). Before any tensor is read, every token id the
tokenizers share must name the same token in each."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from regmean.errors import RegmeanError


@dataclass(frozen=True)
class GrownVocabulary:
    keys: frozenset[str]
    """Tensors with one row per token (embeddings, an untied LM head and its bias)."""
    rows: tuple[int, ...]
    """Each model's row count."""
    tokens: tuple[int, ...]
    """Each model's rows that are tokens of its tokenizer (the rest, if any, pad the table to a round size)."""
    source: int | None
    """The model whose rows added tokens take (tokenizer_source:); None: averaged over the models that have them."""
    tokenizer_model: int
    """The model whose tokenizer (the most tokens) and config the output takes."""

    @property
    def shared(self) -> int:
        """Rows that are a token of every model: merged as usual."""
        return min(self.tokens)

    @property
    def total(self) -> int:
        return max(self.rows)

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape of `key` (a model's shape given): every added row for a vocabulary tensor."""
        return (self.total, *shape[1:]) if key in self.keys else shape


def vocabulary_keys(
    bodies: Sequence[dict[str, tuple[int, ...]]], embedding_keys: set[str]
) -> tuple[frozenset[str], tuple[int, ...]] | None:
    """The tensors whose shapes differ between models in their first dimension only, each model with one row count
    for all of them (its vocabulary), the input embeddings among them; None when no shape differs or the
    differences are not of that kind (e.g. classifier heads of different label counts)."""
    ref = bodies[0]
    keys = frozenset(k for k in ref if any(b.get(k, ref[k]) != ref[k] for b in bodies[1:]))
    if not keys & embedding_keys:
        return None
    rows = []
    for body in bodies:
        counts = {body[k][0] for k in keys if k in body}
        if len(counts) != 1 or any(k in body and body[k][1:] != ref[k][1:] for k in keys):
            return None
        rows.append(counts.pop())
    return keys, tuple(rows)


def token_conflict(vocabularies: Sequence[dict[str, int]], names: Sequence[str]) -> str | None:
    """The first token id two tokenizers give different tokens, as a message; None when every shared id agrees."""
    by_id = [{i: t for t, i in vocab.items()} for vocab in vocabularies]
    largest = max(range(len(by_id)), key=lambda k: len(by_id[k]))
    for k, ids in enumerate(by_id):
        clashes = sorted(i for i, token in ids.items() if i in by_id[largest] and by_id[largest][i] != token)
        if clashes:
            i = clashes[0]
            return (
                f"{names[k]}: token id {i} is {ids[i]!r}, in {names[largest]} it is {by_id[largest][i]!r} "
                f"({len(clashes)} ids differ); the tokenizers differ, not only by added tokens: these models cannot "
                "be merged"
            )
    return None


TOKENIZER_FILES = ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")
"""Besides the vocabulary files: where added tokens are written."""


def without_tokenizer(inputs) -> list[str]:
    """The models (paths) whose folders have no tokenizer files: their vocabulary cannot be checked against the
    others'."""
    from regmean.loading import has_vocabulary, tokenizer_folder

    return [
        str(entry.path)
        for entry, model in zip(inputs.config.models, inputs.models, strict=True)
        if not has_vocabulary(tokenizer_folder(model.folders))
    ]


def unchecked_note(inputs) -> str | None:
    """One console line naming the models whose vocabulary could not be checked, if any."""
    without = without_tokenizer(inputs)
    if not without:
        return None
    return (
        f"note: {len(without)} model(s) without tokenizer files, their vocabulary unchecked against the others' "
        f"(copy the tokenizer in to check it): {', '.join(without[:3])}"
    )


def same_size_conflicts(models: Sequence, names: Sequence[str]) -> list[str]:
    """Models whose vocabularies are of one size may still number tokens differently (`<x1>` and `<y1>` at one
    id): unless their tokenizer files are byte for byte the same, their vocabularies are compared id by id."""
    from regmean.loading import has_vocabulary, load_tokenizer, tokenizer_folder

    folders = [(tokenizer_folder(m.folders), name) for m, name in zip(models, names, strict=True)]
    folders = [(folder, name) for folder, name in folders if has_vocabulary(folder)]
    if len({_tokenizer_digest(folder) for folder, _ in folders}) <= 1:
        return []
    try:
        tokenizers = [load_tokenizer(folder) for folder, _ in folders]
    except RegmeanError as exc:
        return [f"{p} (each model's tokenizer is checked against the others')" for p in exc.problems]
    names = [name for _, name in folders]
    conflict = token_conflict([t.get_vocab() for t in tokenizers], names)
    if conflict:
        return [conflict]
    encoded = [t(PROBE, add_special_tokens=False)["input_ids"] for t in tokenizers]
    other = next((k for k, ids in enumerate(encoded) if ids != encoded[0]), None)
    if other is not None:
        return [
            f"{names[other]}: its tokenizer splits text otherwise than {names[0]}'s (same tokens, other "
            "normalisation or pre-tokenisation: e.g. cased against uncased); these models cannot be merged"
        ]
    return []


PROBE = "Héllo WORLD, it's 2026! naïve Straße   tabs\tand\nlines 123.45 emoji 🙂 <tag> ÄÖÜ"
"""A text that tells apart tokenizers of one vocabulary: case, accents, digits, whitespace, symbols."""


def _past_embeddings(models: Sequence, bodies: Sequence[dict], embedding_keys: set[str]) -> list[str]:
    """`_past_embedding` for every model of one embedding size, once per distinct set of tokenizer files."""
    from regmean.loading import tokenizer_folder

    checked, problems = set(), []
    for model, body in zip(models, bodies, strict=True):
        digest = _tokenizer_digest(tokenizer_folder(model.folders))
        if digest not in checked:
            checked.add(digest)
            problems += _past_embedding(model, body, embedding_keys)
    return problems


def _past_embedding(model, body: dict[str, tuple[int, ...]], embedding_keys: set[str]) -> list[str]:
    """A model whose tokenizer gives ids past its embedding's rows (tokens added, the embeddings not resized) is
    refused, as `measure` refuses it: its model never read those tokens, and the merged model could not."""
    from regmean.loading import has_vocabulary, load_tokenizer, tokenizer_folder

    rows = [body[k][0] for k in embedding_keys if k in body]
    folder = tokenizer_folder(model.folders)
    if not rows or not has_vocabulary(folder):
        return []
    try:
        ids = max(load_tokenizer(folder).get_vocab().values(), default=-1) + 1
    except RegmeanError as exc:
        return exc.problems
    if ids <= min(rows):
        return []
    return [
        f"{folder}: the tokenizer has ids up to {ids - 1}, the model's embedding {min(rows)} rows; resize the "
        "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save both again"
    ]


def _tokenizer_digest(folder: Path) -> str:
    """A hash of the files a tokenizer is read from."""
    from regmean.loading import VOCABULARY_FILES

    digest = hashlib.blake2b(digest_size=16)
    files = sorted({p for pattern in (*VOCABULARY_FILES, *TOKENIZER_FILES) for p in folder.glob(pattern)})
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def merge_added_rows(
    tensors: Sequence[torch.Tensor],
    owners: Sequence[int],
    tokens: Sequence[int],
    weights: torch.Tensor,
    count: int,
    source: int | None,
) -> torch.Tensor:
    """`count` rows past the shared ones, from the models `owners` (tensors[j] holds model owners[j]'s rows of the
    range, of which the first tokens[j] are tokens of its tokenizer, the rest padding): each row the weighted
    average over the models whose token it is, or `source`'s row where it is one of its tokens; a row no tokenizer
    has (padding only) is the average of the models' padding rows."""
    first = tensors[0]
    dtype = torch.promote_types(first.dtype, torch.float32)
    shape = (count, *first.shape[1:])
    sums = {kind: torch.zeros(shape, dtype=dtype, device=first.device) for kind in ("token", "padding")}
    norms = {kind: torch.zeros(count, dtype=dtype, device=first.device) for kind in ("token", "padding")}
    for t, n, k in zip(tensors, tokens, owners, strict=True):
        for kind, rows in (("token", slice(0, n)), ("padding", slice(n, t.shape[0]))):
            sums[kind][rows].add_(t[rows].to(dtype), alpha=float(weights[k]))
            norms[kind][rows] += float(weights[k])
    if bool(((norms["token"] == 0) & (norms["padding"] == 0)).any()):
        raise RegmeanError("added rows without a model that has them")
    column = (count, *[1] * (first.dim() - 1))
    averages = {kind: sums[kind] / norms[kind].clamp_min(1e-300).reshape(column) for kind in sums}
    out = torch.where((norms["token"] > 0).reshape(column), averages["token"], averages["padding"])
    if source is not None and source in owners:
        j = owners.index(source)
        out[: tokens[j]] = tensors[j][: tokens[j]].to(dtype)
    return out


def grown_vocabulary(
    config, models: Sequence, bodies: Sequence[dict], embedding_keys: set[str], method
) -> tuple[GrownVocabulary | None, list]:
    """The models' grown vocabulary (None when their shapes agree, or differ otherwise: reported elsewhere), and
    what keeps it from merging: another method or option, or tokenizers that disagree on a shared id."""
    from regmean.loading import load_tokenizer, tokenizer_folder

    found = vocabulary_keys(bodies, embedding_keys)
    if found is None:
        names = [str(m.path) for m in config.models]
        return None, same_size_conflicts(models, names) + _past_embeddings(models, bodies, embedding_keys)
    keys, rows = found
    paths = [str(m.path) for m in config.models]
    sizes = ", ".join(f"{r}" for r in rows)
    refused = [
        (not method.merges_grown_vocabularies, f"method {config.method} does not; use average or regmean"),
        (config.heads == "keep", "heads: keep does not (one output per model: merge grown vocabularies together)"),
        ("base" in (config.embeddings, config.lm_head), "embeddings/lm_head: base does not (the base lacks them)"),
        (config.lm_head == "regmean", "lm_head: regmean does not (use lm_head: average)"),
    ]
    problems = [f"the models' vocabularies differ ({sizes} rows): {why}" for bad, why in refused if bad]
    try:
        tokenizers = [load_tokenizer(tokenizer_folder(m.folders)) for m in models]
    except RegmeanError as exc:
        return None, problems + [
            f"{p} (the models' vocabularies differ: each tokenizer is checked)" for p in exc.problems
        ]
    conflict = token_conflict([t.get_vocab() for t in tokenizers], paths)
    if conflict:
        problems.append(conflict)
    source = None
    if config.tokenizer_source is not None:
        source = paths.index(str(config.tokenizer_source))
    largest = max(range(len(models)), key=lambda k: (len(tokenizers[k]), -k))
    tokens = tuple(min(len(t), r) for t, r in zip(tokenizers, rows, strict=True))
    return GrownVocabulary(keys, rows, tokens, source, largest), problems
