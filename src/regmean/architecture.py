"""What a model's structure tells us, read from its class on the meta device (no weights loaded).

Linear layers (torch `nn.Linear` and HF GPT-2 `Conv1D`), which of their weights are tied to another parameter,
and which top-level modules are task heads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from regmean.errors import RegmeanError, one_line
from regmean.io.untrusted import compile_pattern, read_model_config


@dataclass(frozen=True)
class LinearLayer:
    """A linear layer y = W x + b. `transposed` is True for Conv1D, which stores W as [d_in, d_out]."""

    module: str
    weight_key: str
    bias_key: str | None
    d_in: int
    d_out: int
    transposed: bool


def model_class(config: transformers.PretrainedConfig, path: str | Path) -> type[transformers.PreTrainedModel]:
    """The transformers model class named by config.architectures[0] of folder `path` (never remote code)."""
    names = config.architectures or []
    where = Path(path) / "config.json"
    if not names or not isinstance(names[0], str):
        raise RegmeanError(f"{where}: model_type {config.model_type!r} names no architectures; set 'architectures'")
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RegmeanError(
            f"{where}: architecture {one_line(names[0], 80)!r} is not a transformers model class (custom code is "
            "not loaded; trust_remote_code is off)"
        )
    return cls


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings (load reports, config notes) silenced: we report what matters in one line."""
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(level)


def load_config(path: str | Path) -> transformers.PretrainedConfig:
    config_file = Path(path) / "config.json"
    read_model_config(Path(path))  # strict JSON, an object: one clear line, not transformers'
    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for configs it cannot use
        raise RegmeanError(f"{config_file}: cannot build a config ({one_line(str(exc), 300)})") from exc


def meta_model(path: str | Path) -> nn.Module:
    """The model's module tree on the meta device: structure and names, no memory, no weights read."""
    config = load_config(path)
    cls = model_class(config, path)
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception as exc:  # a config whose values the class cannot build (negative sizes, ...)
        raise RegmeanError(f"{path}/config.json: cannot build {cls.__name__} ({one_line(str(exc), 300)})") from exc


def linear_layers(model: nn.Module) -> dict[str, LinearLayer]:
    """Every nn.Linear / Conv1D whose weight is not tied to an earlier parameter, by module name."""
    tied = tied_parameters(model)
    out: dict[str, LinearLayer] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            d_out, d_in = mod.weight.shape
            transposed = False
        elif isinstance(mod, Conv1D):
            d_in, d_out = mod.weight.shape
            transposed = True
        else:
            continue
        weight_key = f"{name}.weight"
        if weight_key in tied:
            continue
        bias_key = f"{name}.bias" if getattr(mod, "bias", None) is not None else None
        out[name] = LinearLayer(name, weight_key, bias_key, d_in, d_out, transposed)
    return out


def tied_parameters(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as a parameter listed before them (e.g. a tied lm_head)."""
    first: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        else:
            first[id(param)] = name
    tied.update(getattr(model, "all_tied_weights_keys", None) or {})
    return tied


def head_modules(model: nn.Module, override: list[str] | None = None) -> list[str]:
    """Top-level task-head modules: every child beside the base model (classifier, score, lm_head, ...).

    `override` is a list of regular expressions over module names that replaces the detection.
    """
    if override is not None:
        pats = [compile_pattern(p, "head_modules") for p in override]
        return [n for n, _ in model.named_modules() if n and any(p.fullmatch(n) for p in pats)]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return [n for n, child in model.named_children() if n != prefix and any(True for _ in child.parameters())]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if out_emb is not None and m is out_emb]


def embedding_modules(model: nn.Module) -> tuple[list[str], str | None]:
    """Names of the input embedding module(s) (every module sharing its weight) and of the output embedding."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(inp, "weight", None)
    inputs = [
        n
        for n, m in model.named_modules()
        if m is inp or (weight is not None and getattr(m, "weight", 0) is weight and isinstance(m, nn.Embedding))
    ]
    output = next((n for n, m in model.named_modules() if out is not None and m is out), None)
    return inputs, output


def is_head_key(key: str, heads: list[str]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


def required_keys(model: nn.Module) -> list[str]:
    """State-dict names a checkpoint must hold for `model` (its parameters and persistent buffers), less tied copies
    and what the class declares may be missing; transformers would initialise any absent one at random."""
    tied = tied_parameters(model)
    optional = [compile_pattern(p, type(model).__name__) for p in model._keys_to_ignore_on_load_missing or []]
    return [k for k in model.state_dict() if k not in tied and not any(p.search(k) for p in optional)]


def parameter_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the parameter or buffer of `model` that transformers loads it into: after its one-to-one
    renamings (legacy LayerNorm.gamma -> .weight; GPT-NeoX's embed_out -> lm_head) and its many-to-one fusions
    (Mixtral's per-expert w1/w3 -> experts.gate_up_proj), with or without the base-model prefix. Keys it would not
    place are left out."""
    renamings, fusions = _conversion_rules(model)
    state = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    out: dict[str, str] = {}
    for key in keys:
        name = key
        for pattern, target in renamings:
            name = pattern.sub(target, name)
        for pattern, target in fusions:
            found = pattern.search(name)
            if found:
                name = name[: found.start()] + target + name[found.end() :]
                break
        for candidate in (key, name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in state:
                out[key] = candidate
                break
    return out


def _conversion_rules(model: nn.Module) -> tuple[list[tuple[re.Pattern, str]], list[tuple[re.Pattern, str]]]:
    """transformers' conversion tables for the class: (renamings, fusions), each as (source regex, target); both
    empty if their API moves (only exact names then count)."""
    renamings, fusions = [], []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        for rule in get_model_conversion_mapping(model):
            if len(rule.target_patterns) != 1:
                continue
            rules = [(re.compile(src.replace("*", ".*")), rule.target_patterns[0]) for src in rule.source_patterns]
            if type(rule) is WeightRenaming:
                renamings += rules
            elif type(rule) is WeightConverter:
                fusions += rules
    except Exception:  # noqa: S110 (best effort: exact names are still matched)
        pass
    return renamings, fusions
