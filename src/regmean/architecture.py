"""What a model's structure tells us, read from its class on the meta device (no weights loaded).

Linear layers (torch `nn.Linear` and HF GPT-2 `Conv1D`), which of their weights are tied to another parameter,
and which top-level modules are task heads.
"""

from __future__ import annotations

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
    expert: int | None = None
    """For an expert stored in a 3-D tensor: its row of the first axis (W is `weight_key`[expert])."""


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
    """transformers' own warnings (load reports, config notes) and progress bars (loading, writing shards)
    silenced: we report what matters in one line, and show our own progress."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


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


EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
"""The projections of one expert, as the per-expert checkpoint keys of most families name them."""


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block's experts as transformers stores them: 3-D parameters `gate_up_proj` (or `up_proj`
    when not gated) [E, out, in] and `down_proj` [E, d_model, d_inner] ([E, in, out] when `transposed`)."""

    module: str
    count: int
    d_model: int
    d_inner: int
    gated: bool
    transposed: bool
    parameter_free: int = 0
    """Experts past the `count` with weights that route tokens but compute nothing (LongCat's zero experts, whose
    gate/up rows the fused tensor keeps unused): a block's routed rows are then at most top-k x tokens."""

    def slot(self, expert: int, part: str) -> str:
        """The name statistics and merges give one expert's projection: `<experts module>.<expert>.<part>`."""
        return f"{self.module}.{expert}.{part}"

    def reads(self, expert: int) -> dict[str, list[str]]:
        """Expert `expert`'s two inputs, each named after its first reader: the routed hidden states (read by gate
        and up) and the down projection's input."""
        first = [self.slot(expert, "gate_proj"), self.slot(expert, "up_proj")] if self.gated else []
        first = first or [self.slot(expert, "up_proj")]
        return {first[0]: first, self.slot(expert, "down_proj"): [self.slot(expert, "down_proj")]}


def expert_modules(model: nn.Module) -> list[Experts]:
    """Every experts module of `model` that keeps its experts in 3-D `down_proj` and `gate_up_proj` / `up_proj`:
    in transformers' common form (its `use_experts_implementation` layout attributes) or, gated, in a layout its
    shapes tell (Llama-4, Step-3.7). Others (DBRX's 2-D stacks, JetMoE's) are left to the plain rule (averaged, and
    said)."""
    return [experts for name, mod in model.named_modules() if (experts := _experts(name, mod)) is not None]


def _experts(name: str, mod: nn.Module) -> Experts | None:
    """`mod` as an experts module, or None if it is none we recognise."""
    down = getattr(mod, "down_proj", None)
    gated = isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter)
    up = getattr(mod, "gate_up_proj" if gated else "up_proj", None)
    if hasattr(mod, "gate_proj") or not (isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter)):
        return None
    if down.dim() != 3 or up.dim() != 3:
        return None
    if hasattr(mod, "is_transposed") and hasattr(mod, "has_gate"):
        transposed = bool(mod.is_transposed)
    elif gated and down.shape[0] in (getattr(mod, "num_experts", None), getattr(mod, "num_routed_experts", None)):
        transposed = _gated_layout(tuple(up.shape), tuple(down.shape))
    else:
        return None
    if transposed is None:
        return None
    count, d_model, d_inner = down.shape if not transposed else (down.shape[0], down.shape[2], down.shape[1])
    return Experts(name, count, d_model, d_inner, gated, transposed, up.shape[0] - count)


def _gated_layout(gate_up: tuple[int, ...], down: tuple[int, ...]) -> bool | None:
    """Whether gated experts of these shapes are transposed ([E, d, 2I] and [E, I, d]) or not ([E, 2I, d] and
    [E, d, I]); None for shapes of neither layout (the factor 2 of the fused gate and up tells them apart). The
    gate/up may hold rows past the E experts (LongCat's, for its parameter-free zero experts: never used)."""
    if gate_up[0] < down[0]:
        return None
    if gate_up[1:] == (2 * down[2], down[1]):
        return False
    if gate_up[1:] == (down[2], 2 * down[1]):
        return True
    return None


def expert_slots(model: nn.Module) -> dict[str, tuple[Experts, int]]:
    """Every expert projection's name (`Experts.slot`) -> its experts and expert index."""
    slots = {}
    for experts in expert_modules(model):
        parts = EXPERT_PARTS if experts.gated else EXPERT_PARTS[1:]
        for e in range(experts.count):
            slots.update({experts.slot(e, part): (experts, e) for part in parts})
    return slots


def _router(mod: nn.Module) -> bool:
    """A mixture-of-experts router: F.linear(hidden states, weight [E, d_model]) for its E experts' scores (with a
    row more per shared expert where it scores those too, as Inkling's)."""
    weight = getattr(mod, "weight", None)
    experts = getattr(mod, "num_experts", None)
    shared = getattr(mod, "n_shared_experts", 0)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 2 and isinstance(experts, int)):
        return False
    return weight.shape[0] == experts or (isinstance(shared, int) and weight.shape[0] == experts + shared)


def linear_layers(model: nn.Module) -> dict[str, LinearLayer]:
    """Every nn.Linear / Conv1D / mixture-of-experts router whose weight is not tied to an earlier parameter, by
    module name."""
    tied = tied_parameters(model)
    out: dict[str, LinearLayer] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or _router(mod):
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
        bias_key = f"{name}.bias" if isinstance(getattr(mod, "bias", None), torch.Tensor) else None
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
