"""Open and cross-check every input of a merge, reporting all problems at once, before any merging."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from regmean.architecture import (
    LinearLayer,
    embedding_modules,
    head_modules,
    is_head_key,
    linear_layers,
    meta_model,
    required_keys,
)
from regmean.checkpoint_keys import expert_layers, parameter_names, split_layers, split_parameters
from regmean.errors import RegmeanError, one_line
from regmean.io.adapter import open_model
from regmean.io.checkpoint import Checkpoint
from regmean.io.untrusted import resolve_user_path
from regmean.merge.config import MergeConfig
from regmean.methods import METHODS
from regmean.statistic import StatisticsSource
from regmean.vocabulary import GrownVocabulary, grown_vocabulary


@dataclass
class MergeInputs:
    config: MergeConfig
    models: list[Checkpoint]
    stats: list[StatisticsSource] | None
    """Each model's statistics, of the kind the method reads (None for data-free methods)."""
    base: Checkpoint | None
    skeleton: nn.Module
    linears: dict[str, LinearLayer]
    heads: list[str]
    embeddings: list[str]  # input embedding modules
    lm_head: str | None  # output embedding module
    vocab: GrownVocabulary | None = None
    """Where the models' vocabularies differ by added tokens: which tensors, and their rows."""
    parameter_names: dict[str, str] = field(default_factory=dict)
    """Checkpoint key -> the parameter it loads into (`checkpoint_keys.parameter_names`: GPT-NeoX's embed_out.weight ->
    lm_head.weight); the linear layers' keys are checkpoint keys already."""
    exact_keys: frozenset[str] = frozenset()
    """Tensors the output needs whole and unrounded (an adapter output factors them): merged in one step, in at
    least float32."""

    def module_of(self, key: str) -> str:
        """The module of the skeleton a checkpoint key belongs to."""
        return self.parameter_names.get(key, key).rsplit(".", 1)[0]

    def output_dtype(self, key: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype merged tensor `key` (of input dtype `dtype`) leaves its step in."""
        if key in self.exact_keys:
            return torch.promote_types(dtype, torch.float32)
        return self.config.output_dtype(dtype)

    def body_keys(self) -> list[str]:
        """Tensors merged into the body: every key, less the heads when each model keeps its own."""
        keys = self.models[0].keys()
        if self.config.heads == "keep":
            keys = [k for k in keys if not is_head_key(k, self.heads)]
        return keys

    def output_shape(self, key: str) -> tuple[int, ...]:
        shape = self.models[0].shapes[key]
        return shape if self.vocab is None else self.vocab.shape(key, shape)

    def head_keys(self) -> list[str]:
        return [k for k in self.models[0].keys() if is_head_key(k, self.heads)] if self.config.heads == "keep" else []

    def base_key(self, key: str) -> str | None:
        """The base model's name for `key`: the same, or without the task model's base prefix (e.g. 'bert.')."""
        return _base_key(self.base, key, self.skeleton)


def _base_key(base: Checkpoint, key: str, skeleton: nn.Module) -> str | None:
    if key in base:
        return key
    prefix = getattr(skeleton, "base_model_prefix", "")
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in base:
        return key[len(prefix) + 1 :]
    return None


def _in_checkpoint(layer: LinearLayer, parameters: dict[str, str]) -> LinearLayer:
    """The layer with its weight and bias keys as the checkpoint names them (where one key loads into each)."""
    keys: dict[str, list[str]] = {}
    for key, name in parameters.items():
        keys.setdefault(name, []).append(key)

    def key_of(name: str) -> str:
        return keys[name][0] if len(keys.get(name, [])) == 1 else name

    return replace(layer, weight_key=key_of(layer.weight_key), bias_key=layer.bias_key and key_of(layer.bias_key))


def _kept_head_problems(config: MergeConfig, heads: list[str], first: Checkpoint, first_path) -> list[str]:
    """heads: keep needs heads to keep, and a body left to merge."""
    if not heads:
        named = f"head_modules {config.head_modules}" if config.head_modules else "the model"
        return [
            f"heads: keep, but {named} names no head module: every output would be the same merged model; name "
            "the heads or use heads: merge"
        ]
    if all(is_head_key(k, heads) for k in first.keys()):
        return [
            f"head_modules {config.head_modules or heads} cover every tensor of {first_path}: nothing would be "
            "merged; name only the task heads"
        ]
    return []


def open_inputs(config: MergeConfig) -> MergeInputs:
    """Every input opened (headers only) and checked, with the method's own checks; all problems in one error."""
    problems: list[str] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except RegmeanError as exc:
            problems.extend(exc.problems)
            return None

    bases: dict = {}  # adapters over one base share it (hashed once)
    models = [attempt(open_model, m.path, config.base_model, config.allow_pickle, bases) for m in config.models]
    method = METHODS[config.method]
    kind = method.statistics
    stats = [attempt(kind.reader, m.statistics) for m in config.models] if kind else None
    base = None
    if config.base_model:
        known = bases.get(resolve_user_path(config.base_model, "base model"))
        base = known or attempt(Checkpoint, config.base_model, config.allow_pickle)
    if problems:
        raise RegmeanError(problems)

    first, first_path = models[0], config.models[0].path
    skeleton = attempt(meta_model, first.folders[0])
    if skeleton is None:
        raise RegmeanError(problems)
    heads = head_modules(skeleton, config.head_modules)
    ignore_heads = config.heads == "keep"
    problems += _kept_head_problems(config, heads, first, first_path) if ignore_heads else []

    def body(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in ckpt.shapes.items() if not (ignore_heads and is_head_key(k, heads))}

    ref = body(first)
    embedding_keys = {f"{name}.weight" for name in embedding_modules(skeleton)[0]}
    vocab, vocab_problems = grown_vocabulary(config, models, [body(m) for m in models], embedding_keys, method)
    problems += vocab_problems
    problems += _disagreements(config, models, body, vocab, heads)
    splits = split_parameters(skeleton, first.keys())
    parameters = parameter_names(skeleton, first.keys()) | {key: targets[0] for key, targets in splits.items()}
    loaded = set(parameters.values()) | {target for targets in splits.values() for target in targets}
    problems += _required_problems(skeleton, loaded, first, first_path)
    if problems:  # the models disagree: nothing below can be checked meaningfully
        raise RegmeanError(problems)
    linears = {m: _in_checkpoint(layer, parameters) for m, layer in linear_layers(skeleton).items()}
    linears = split_layers(linears, splits)
    linears |= expert_layers(skeleton, first.shapes)
    embeddings, lm_head = embedding_modules(skeleton)
    inputs = MergeInputs(config, models, stats, base, skeleton, linears, heads, embeddings, lm_head, vocab, parameters)
    problems = _base_problems(inputs, ref) if base is not None else []
    try:  # the method's own header checks, reported with the base model's
        problems += method.check(inputs)
    except RegmeanError as exc:
        problems += exc.problems
    if not problems and stats is not None:  # hashing reads every weight: only when nothing else is wrong
        problems = _fingerprint_problems(inputs)
    if problems:
        raise RegmeanError(problems)
    return inputs


def _required_problems(skeleton: nn.Module, loaded: set[str], first: Checkpoint, first_path) -> list[str]:
    """Every parameter the model class needs loads from some checkpoint key of the first model (`loaded`)."""
    needed = [k for k in required_keys(skeleton) if k not in loaded]
    if not needed:
        return []
    return [
        f"{first_path}: lacks {len(needed)} tensors its architecture {first.architecture} needs, e.g. {needed[0]} "
        "(loading would initialise them at random); re-save the model with save_pretrained"
    ]


def _disagreements(
    config: MergeConfig, models: list[Checkpoint], body: Callable, vocab: GrownVocabulary | None, heads: list[str]
) -> list[str]:
    """Each model against the first: same architecture, same body tensors, same shapes (added tokens aside)."""
    first, first_path, ref = models[0], config.models[0].path, body(models[0])
    problems = []
    for entry, ckpt in zip(config.models[1:], models[1:], strict=True):
        if ckpt.architecture != first.architecture:
            problems.append(
                f"{entry.path}: architecture {ckpt.architecture} differs from {first_path} ({first.architecture})"
            )
            continue
        other = body(ckpt)
        missing, extra = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
        if missing or extra:
            problems.append(
                f"{entry.path}: tensors differ from {first_path} (missing {missing[:3]}, extra {extra[:3]})"
            )
            continue
        bad = [k for k in ref if ref[k] != other[k] and not (vocab and k in vocab.keys)]
        if bad:
            note = " (different vocabularies?)" if any("embed" in k for k in bad) else ""
            hint = "; heads of different tasks need heads: keep" if any(is_head_key(k, heads) for k in bad) else ""
            problems.append(
                f"{entry.path}: shape of {bad[0]} is {other[bad[0]]}, {first_path} has {ref[bad[0]]}"
                f"{note}{hint} ({len(bad)} tensors differ)"
            )
    return problems


def _base_problems(inputs: MergeInputs, body: dict[str, tuple[int, ...]]) -> list[str]:
    """The base model has every body tensor (heads aside), each with the fine-tuned models' shape."""
    absent, mismatched = [], []
    for key, shape in body.items():
        if inputs.vocab is not None and key in inputs.vocab.keys:  # the methods that read a base refuse these
            continue
        name = inputs.base_key(key)
        if name is None:
            if not is_head_key(key, inputs.heads):
                absent.append(key)
        elif inputs.base.shapes[name] != shape:
            mismatched.append(key)
    where = inputs.config.base_model
    problems = [f"{where}: base model lacks {len(absent)} body tensors, e.g. {absent[0]}"] if absent else []
    if mismatched:
        key = mismatched[0]
        problems.append(
            f"{where}: shape of {key} is {inputs.base.shapes[inputs.base_key(key)]}, the models' is {body[key]} "
            f"({len(mismatched)} tensors differ); a base model must have the fine-tuned models' shapes"
        )
    return problems


def _fingerprint_problems(inputs: MergeInputs) -> list[str]:
    """Each statistics file was measured on its model (the models' weights hashed concurrently: reads and hashing
    release the GIL)."""
    with ThreadPoolExecutor(min(len(inputs.models), os.cpu_count() or 1)) as pool:
        list(pool.map(lambda c: c.fingerprint, inputs.models))
    problems = []
    for entry, ckpt, st in zip(inputs.config.models, inputs.models, inputs.stats, strict=True):
        if st.fingerprint != ckpt.fingerprint:
            problems.append(
                f"{st.path}: statistics were measured on another model than {entry.path} "
                f"(fingerprint {st.fingerprint.get('weights', '?')[:12]} vs {ckpt.fingerprint['weights'][:12]}); "
                "measure this model"
            )
    return problems


CONFIG_BOOKKEEPING = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "vocab_size", "use_cache"}
    | {"id2label", "label2id", "num_labels", "finetuning_task", "problem_type", "task_specific_params"}
)
"""config.json fields that name, label or store a model rather than set its computation (architectures, vocabulary
and heads are checked on their own)."""


def config_differences(inputs: MergeInputs) -> list[str]:
    """The config.json settings in which a model differs from the first ('num_experts_per_tok: 1 in b, 2 in a'):
    the output has one model's config, so each is said."""
    first, first_path = inputs.models[0].config, inputs.config.models[0].path
    said = []
    for entry, ckpt in zip(inputs.config.models[1:], inputs.models[1:], strict=True):
        for key in sorted((set(first) | set(ckpt.config)) - CONFIG_BOOKKEEPING):
            if first.get(key) != ckpt.config.get(key):
                theirs, ours = (one_line(repr(c.get(key, "unset")), 40) for c in (ckpt.config, first))
                said.append(f"{key}: {theirs} in {entry.path}, {ours} in {first_path}")
    return said


def config_note(differences: list[str]) -> str:
    """One console line for `config_differences`."""
    more = f"; {len(differences) - 3} more" if len(differences) > 3 else ""
    return (
        f"note: the models' configs differ (the output has one's, as the card says): {'; '.join(differences[:3])}{more}"
    )
