"""A PEFT LoRA adapter folder read as the model it adapts: each adapted weight materialised on request,
W = W_base + s B A (s = alpha / r, or alpha / sqrt(r) with rsLoRA), one tensor or row block at a time."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from regmean.dtypes import STORED, STORED_FLOATS
from regmean.errors import RegmeanError, RegmeanWarning, one_line
from regmean.io.adapter_targets import check_targets, conv1d_modules
from regmean.io.checkpoint import ADAPTER_CONFIG, Checkpoint
from regmean.io.tensorfile import TensorFile
from regmean.io.untrusted import UserPattern, check_finite, compile_pattern, read_json_object, resolve_user_path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAVED_PREFIX = "base_model.model."
VARIANTS = (
    ("use_dora", "DoRA"),
    ("use_qalora", "QA-LoRA"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("trainable_token_indices", "trainable tokens"),
    ("arrow_config", "Arrow routing"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("kasa_config", "KaSA"),
    ("monteclora_config", "MonteCLoRA"),
)
"""Adapter options that change what the adapted layers compute: W + s B A would not be the adapted weight."""
DEFAULT_R, DEFAULT_ALPHA = 8, 8
"""peft's LoraConfig defaults for `r` and `lora_alpha`."""
LORA_PARTS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
}


FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass
class LoraPair:
    """The low-rank update of one weight: delta = B @ A (transposed for Conv1D and embeddings), times `scale`."""

    a: str
    b: str
    scale: float
    transposed: bool
    bias: str | None = None  # lora_B's bias (lora_bias: true), added to the layer's bias times `scale`


def open_model(path: str | Path, base: str | Path | None = None, allow_pickle: bool = False, bases: dict | None = None):
    """A model folder as a Checkpoint, or a LoRA adapter folder over its base model as an AdaptedCheckpoint
    (adapters given the same `bases` dict share one opened base per folder: its weights are hashed once)."""
    if is_adapter(path):
        full = [name for name in FULL_MODEL_FILES if (Path(path) / name).is_file()]
        if full:
            raise RegmeanError(
                f"{path}: holds both a LoRA adapter ({ADAPTER_CONFIG}) and a full model ({full[0]}); which one is "
                "meant is ambiguous: move the adapter (or the model) to a folder of its own"
            )
        return AdaptedCheckpoint(path, base, allow_pickle, bases)
    return Checkpoint(path, allow_pickle)


def implied_base(path: str | Path) -> Path | None:
    """The local base folder an adapter's config names (read, so an input, when no base is given), or None."""
    if not is_adapter(path):
        return None
    try:
        named = read_json_object(Path(path) / ADAPTER_CONFIG, "an adapter config").get("base_model_name_or_path")
    except RegmeanError:
        return None  # (the adapter itself is refused, with its reason, when opened)
    return Path(named) if isinstance(named, str) and named and Path(named).is_dir() else None


def input_paths(models: list[Path], base: Path | None) -> list[tuple[str, Path]]:
    """The models, and the base model they are read over: the one given, else each adapter's implied base."""
    bases = [base] if base is not None else [b for m in models if (b := implied_base(m)) is not None]
    return [("model", m) for m in models] + [("base model", b) for b in dict.fromkeys(bases)]


def base_folder(adapter: Path, config: dict, given: str | Path | None) -> Path:
    """The base model of an adapter: the one given, else the adapter config's own base path if it is a local folder."""
    named = config.get("base_model_name_or_path")
    if given is not None:
        local = isinstance(named, str) and named and Path(named).is_dir()
        if local and os.path.realpath(named) != os.path.realpath(given):
            message = (
                f"{adapter}: trained over {named} (its adapter_config.json says), used over {given}: unless the two "
                "are the same model, the results are of a model nobody has"
            )
            warnings.warn(RegmeanWarning(one_line(message)), stacklevel=2)
        return Path(given)
    if isinstance(named, str) and named and Path(named).is_dir():
        return Path(named)
    where = f" ({named!r} is not a local folder)" if named else ""
    raise RegmeanError(
        f"{adapter}: a LoRA adapter without its base model{where}; give the base model folder "
        "(`base_model:` in a merge recipe, --base for measure and evaluate)"
    )


MAX_UPDATE = 1e4
"""The largest entry an update s B A may reach: trained weights are orders of magnitude smaller, and activations
through such a weight overflow half precision (a bound on every entry: a sane adapter never comes near it)."""


class AdaptedCheckpoint:
    """Base weights plus a LoRA adapter, with a Checkpoint's read interface (names, shapes and dtypes are the
    base's; `modules_to_save` and trained biases replace the base's tensors)."""

    def __init__(
        self, path: str | Path, base: str | Path | None = None, allow_pickle: bool = False, bases: dict | None = None
    ):
        self.path = Path(path)
        self.adapter_config = read_json_object(self.path / ADAPTER_CONFIG, "a PEFT adapter config")
        _check_config(self.path, self.adapter_config)
        self.rank_pattern = _patterns(self.path, self.adapter_config, "rank_pattern")
        self.alpha_pattern = _patterns(self.path, self.adapter_config, "alpha_pattern")
        folder = base_folder(self.path, self.adapter_config, base)
        bases = {} if bases is None else bases
        real = resolve_user_path(folder, "base model")
        if real not in bases:
            bases[real] = Checkpoint(folder, allow_pickle)
        self.base = bases[real]
        self.config, self.key_to_file = self.base.config, self.base.key_to_file
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise RegmeanError(f"{weights}: adapter weights missing (save the adapter with save_pretrained)")
        self.file = TensorFile(weights)
        self.pairs, self.replaced = self._read_layout()

    @property
    def folders(self) -> tuple[Path, Path]:
        """Where config and tokenizer files come from: the base's, then the adapter's own (added tokens)."""
        return (self.base.path, self.path)

    @property
    def architecture(self) -> str:
        return self.base.architecture

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> str:
        return self.base.dtype(key)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.base.shapes

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The adapted tensor (or its rows [start, stop)) in the base's dtype: W_base + s B A computed in float32
        and rounded once (peft's merge adds in the base's dtype: the same for float32 bases)."""
        if key in self.replaced:  # a saved tensor (modules_to_save, a trained bias, a saved base layer)
            source = self.replaced[key]
            saved = self.file.get(source, rows).to(STORED[self.base.dtype(key)])  # the dtype the output plans
            base = check_finite(saved, f"{self.file.path}: tensor {source}")
        else:
            base = self.base.get(key, rows)
        if key not in self.pairs:
            return base
        pair = self.pairs[key]
        start, stop = rows if rows is not None else (0, base.shape[0])
        if pair.bias is not None:
            delta = self.file.get(pair.bias).float()[start:stop]
            return (base.float() + pair.scale * delta).to(base.dtype)
        a, b = self.file.get(pair.a).float(), self.file.get(pair.b).float()
        check_finite(a, f"{self.file.path}: tensor {pair.a}")
        check_finite(b, f"{self.file.path}: tensor {pair.b}")
        left, right = (a[:, start:stop].T, b.T) if pair.transposed else (b[start:stop], a)
        return (base.float() + pair.scale * _low_rank_product(left, right)).to(base.dtype)

    @cached_property
    def fingerprint(self) -> dict[str, str]:
        """The base's fingerprint with the adapter's tensors and scales hashed into its weights."""
        digest = hashlib.blake2b(self.base.fingerprint["weights"].encode(), digest_size=16)
        for key in sorted(self.file.keys()):
            digest.update(f"{key}:{STORED[self.file.dtype(key)]}:{self.file.shape(key)};".encode())
            for piece in self.file.chunks(key):
                check_finite(piece, f"{self.file.path}: tensor {key}")
                digest.update(piece.view(torch.uint8).numpy())
        for key in sorted(self.pairs):
            digest.update(f"{key}:{self.pairs[key].scale!r}:{self.pairs[key].transposed};".encode())
        return {**self.base.fingerprint, "weights": digest.hexdigest()}

    # -- layout ------------------------------------------------------------------------------------
    def _read_layout(self) -> tuple[dict[str, LoraPair], dict[str, str]]:
        """Base key -> its LoRA pair (weight and, with lora_bias, bias), and base key -> the adapter tensor that
        replaces it; every adapter tensor accounted for and shaped for its base tensor."""
        modules: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in self.file.keys():
            if not key.startswith(SAVED_PREFIX):
                raise RegmeanError(f"{self.file.path}: tensor {key} is not a PEFT adapter's (no {SAVED_PREFIX!r})")
            name = key[len(SAVED_PREFIX) :]
            if ".original_module." in name:  # the frozen copy a modules_to_save wrapper keeps: not the trained one
                continue
            for wrapper in (".base_layer.", ".modules_to_save."):  # a wrapped layer's own tensors
                name = name.replace(wrapper, ".")
            part = next((p for p in LORA_PARTS if name.endswith("." + p)), None)
            if part is None:
                if ".lora_" in name:
                    raise RegmeanError(f"{self.file.path}: tensor {key} is of a LoRA variant regmean cannot merge")
                replaced[self._base_key(name, key)] = key
                continue
            modules.setdefault(name[: -len(part) - 1], {})[LORA_PARTS[part]] = key
        pairs = {}
        for module, parts in modules.items():
            if "A" not in parts or "B" not in parts:
                raise RegmeanError(f"{self.file.path}: module {module} lacks its lora_A or lora_B tensor")
            self._check_dtypes(parts.values())
            weight = self._base_key(module + ".weight", parts["A"])
            pair = LoraPair(parts["A"], parts["B"], 0.0, self._transposed(module, parts))
            self._check_shapes(weight, pair, parts.get("bias"))
            pair.scale = self._scale(module, pair)
            self._check_magnitude(module, pair, parts.get("bias"))
            pairs[weight] = pair
            if "bias" in parts:
                bias = self._base_key(module + ".bias", parts["bias"])
                pairs[bias] = LoraPair(pair.a, pair.b, pair.scale, pair.transposed, bias=parts["bias"])
        for key, source in replaced.items():
            self._check_replaced_dtype(key, source)
            if self.file.shape(source) != self.base.shape(key):
                raise RegmeanError(
                    f"{self.file.path}: {source} is {list(self.file.shape(source))}, the base's {key} is "
                    f"{list(self.base.shape(key))}; give the base model the adapter was trained on"
                )
        saved = [key.rsplit(".", 1)[0] for key in replaced]
        base = {key.rsplit(".", 1)[0] for key in self.base.keys()}
        check_targets(self.path / ADAPTER_CONFIG, self.adapter_config, list(modules), saved, base)
        return pairs, replaced

    def _base_key(self, name: str, source: str) -> str:
        if name not in self.base:
            raise RegmeanError(
                f"{self.file.path}: {source} adapts {name}, which the base model {self.base.path} lacks; "
                "give the base model the adapter was trained on"
            )
        return name

    def _scale(self, module: str, pair: LoraPair) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA), with r and alpha as peft gives them to `module` (the first
        rank_pattern / alpha_pattern key that matches it, else `r` / `lora_alpha`): r must be the tensors' rank."""
        config = self.adapter_config
        r, r_from = _setting(self.rank_pattern, module, config.get("r", DEFAULT_R), "r")
        alpha, _ = _setting(self.alpha_pattern, module, config.get("lora_alpha", DEFAULT_ALPHA), "lora_alpha")
        rank = self.file.shape(pair.a)[0]
        if r != rank:
            raise RegmeanError(
                f"{self.path / ADAPTER_CONFIG}: {r_from} gives {module} rank {r!r:.40}, but its tensors {pair.a} and "
                f"{pair.b} in {self.file.path} have rank {rank} (peft cannot load this adapter); fix the config "
                "or save the adapter again"
            )
        return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)

    def _check_magnitude(self, module: str, pair: LoraPair, bias: str | None) -> None:
        """Refuse, before any work, an update s B A whose entries could pass `MAX_UPDATE` (so never overflow any
        float dtype): every entry is at most |s| sum_k max|B[:, k]| max|A[k, :]| (of s times a trained bias,
        |s| max|bias|)."""
        a, b = self._finite(pair.a), self._finite(pair.b)
        bound = abs(pair.scale) * float((b.abs().amax(0) * a.abs().amax(1)).sum())
        if bias is not None:
            bound = max(bound, abs(pair.scale) * float(self._finite(bias).abs().max()))
        if not bound <= MAX_UPDATE:
            kind = "sqrt(r)" if self.adapter_config.get("use_rslora") else "r"
            raise RegmeanError(
                f"{self.path / ADAPTER_CONFIG}: the scale lora_alpha / {kind} = {pair.scale:.3g} of {module} times its "
                f"LoRA tensors in {self.file.path} can reach {bound:.3g}, above {MAX_UPDATE:g}: far beyond any "
                "trained weight (activations through it would overflow); fix lora_alpha"
            )

    def _finite(self, key: str) -> torch.Tensor:
        return check_finite(self.file.get(key).double(), f"{self.file.path}: tensor {key}")

    def _check_dtypes(self, keys: Iterable[str]) -> None:
        """LoRA tensors are floating point (an I32 or BOOL tensor would be merged as numbers)."""
        for key in keys:
            if self.file.dtype(key) not in STORED_FLOATS:
                raise RegmeanError(
                    f"{self.file.path}: tensor {key} is {self.file.dtype(key)}; LoRA tensors must be floating point "
                    f"({', '.join(STORED_FLOATS)}): save the adapter again"
                )

    def _check_replaced_dtype(self, key: str, source: str) -> None:
        """A saved tensor replacing a base tensor is of the base's dtype, or floating point over a floating one."""
        stored, base = self.file.dtype(source), self.base.dtype(key)
        if stored != base and not (stored in STORED_FLOATS and STORED[base].is_floating_point):
            raise RegmeanError(
                f"{self.file.path}: tensor {source} is {stored}, but the base's {key} it replaces is {base}; a saved "
                f"tensor must be of the base's dtype or floating point ({', '.join(STORED_FLOATS)}): save it again"
            )

    def _transposed(self, module: str, parts: dict[str, str]) -> bool:
        """Embeddings (lora_embedding_*) and Conv1D layers store the weight as [in, out] (peft decides by the
        module's type, whatever fan_in_fan_out says)."""
        return parts["A"].endswith("lora_embedding_A") or module in self._conv1d

    @cached_property
    def _conv1d(self) -> set[str]:
        return conv1d_modules(self.base.path)

    def _check_shapes(self, weight: str, pair: LoraPair, bias: str | None) -> None:
        a, b, shape = self.file.shape(pair.a), self.file.shape(pair.b), self.base.shape(weight)
        want = None if len(a) != 2 or len(b) != 2 else (b[0], a[1]) if not pair.transposed else (a[1], b[0])
        if bias is not None and (not b or self.file.shape(bias) != (b[0],)):
            raise RegmeanError(f"{self.file.path}: {bias} is {list(self.file.shape(bias))}, not one entry per output")
        if want is None or a[0] < 1 or a[0] != b[1] or tuple(shape) != want:
            raise RegmeanError(
                f"{self.file.path}: LoRA tensors {list(a)} and {list(b)} do not fit {weight} of shape "
                f"{list(shape)}; give the base model the adapter was trained on"
            )


def _low_rank_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right ([rows, r] @ [r, cols]) as r outer products added in order: every entry is summed the same way
    whatever the rows asked for, so a block of rows equals those rows of the whole tensor bit for bit (a matmul's
    kernel may block the sum differently for another row count)."""
    out = left.new_zeros(left.shape[0], right.shape[1])
    for k in range(left.shape[1]):
        out.addr_(left[:, k], right[k])
    return out


def _check_config(path: Path, config: dict) -> None:
    """A LoRA adapter of the plain kind, with options of the types peft writes."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise RegmeanError(f"{path / ADAPTER_CONFIG}: adapter type {kind!r} is not supported; regmean reads LoRA only")
    used = [label for option, label in VARIANTS if config.get(option)]
    if used:
        raise RegmeanError(
            f"{path / ADAPTER_CONFIG}: {used[0]} adapters are not supported (the update is not W + B A); "
            "merge the adapter into its model first (peft's merge_and_unload) and give that folder"
        )
    _check_setting(path, "r", config.get("r", DEFAULT_R), rank=True)
    _check_setting(path, "lora_alpha", config.get("lora_alpha", DEFAULT_ALPHA), rank=False)
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):
            raise RegmeanError(f"{path / ADAPTER_CONFIG}: {flag} must be true or false, not {config[flag]!r:.40}")


def _check_setting(path: Path, name: str, value: Any, rank: bool) -> None:
    """An `r` (a whole number, at least 1) or a `lora_alpha` (a finite number), as peft needs them."""
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    try:
        finite = number is not None and math.isfinite(float(number))
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite or (rank and (not isinstance(number, int) or number < 1)):
        need = "a whole number of at least 1" if rank else "a finite number"
        raise RegmeanError(f"{path / ADAPTER_CONFIG}: {name} is {value!r:.40}; it must be {need}")


def _patterns(path: Path, config: dict, field: str) -> list[tuple[str, UserPattern, Any]]:
    """peft's per-module overrides (`rank_pattern`, `alpha_pattern`) in their order: each key named, the key as peft
    matches it (it ends the module name, after a dot or from the start), and its value, checked as `r` or
    `lora_alpha` is. The keys are untrusted regular expressions: matching them is bounded in time."""
    given = config.get(field) or {}
    if not isinstance(given, dict):
        raise RegmeanError(f"{path / ADAPTER_CONFIG}: {field} must map module patterns to numbers")
    out = []
    for key, value in given.items():
        _check_setting(path, f"{field} {key!r:.80}", value, rank=field == "rank_pattern")
        pattern = compile_pattern(rf"(.*\.)?({key})$", f"{path / ADAPTER_CONFIG}: {field}", shown=key)
        out.append((f"{field} {key!r:.80}", pattern, value))
    return out


def _setting(patterns: list[tuple[str, UserPattern, Any]], module: str, default: Any, name: str) -> tuple[Any, str]:
    """A module's r or alpha as peft resolves it: the value of the first pattern matching it, else the default; and
    where it came from (for messages)."""
    for named, pattern, value in patterns:
        if pattern.match(module):
            return value, named
    return default, name
