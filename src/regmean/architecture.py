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


def parameter_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the parameter or buffer of `model` that transformers loads it into: after its one-to-one
    renamings (legacy LayerNorm.gamma -> .weight; GPT-NeoX's embed_out -> lm_head) and its many-to-one fusions
    (Mixtral's per-expert w1/w3 -> experts.gate_up_proj), with or without the base-model prefix. Keys it would not
    place are left out."""
    rules = _conversion_rules(model)
    state = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    out: dict[str, str] = {}
    for key in keys:
        name, _ = _loaded_name(key, rules)
        for candidate in (key, name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in state:
                out[key] = candidate
                break
    return out


def expert_layers(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, LinearLayer]:
    """One linear layer per expert projection, named by `Experts.slot` (a fused gate/up by its gate), its weight key
    the checkpoint's: a 2-D tensor of its own (as save_pretrained writes Mixtral, Qwen-MoE, OLMoE, DeepSeek: the
    expert is the key's last number, gate or up its place in transformers' fusion rule), or row `expert` of a 3-D
    tensor stored fused (GPT-OSS)."""
    rules = _conversion_rules(model)
    fused = _fused_parts(model)
    out = {}
    for key, name in parameter_names(model, list(shapes)).items():
        if name not in fused:
            continue
        experts, parts = fused[name]
        if len(shapes[key]) == 3:
            out |= _expert_rows(experts, parts, key, shapes[key])
            continue
        numbers = [int(part) for part in key.split(".") if part.isdigit()]
        _, place = _loaded_name(key, rules)
        if len(shapes[key]) != 2 or not numbers or place is None or place >= len(parts) or experts.transposed:
            continue
        d_out, d_in = shapes[key]
        wide = experts.d_inner if parts[place] == "down_proj" else experts.d_model
        if d_in == wide and 0 <= numbers[-1] < experts.count:
            slot = experts.slot(numbers[-1], parts[place])
            out[slot] = LinearLayer(slot, key, None, d_in, d_out, False)
    return out


def _expert_rows(experts: Experts, parts: tuple[str, ...], key: str, shape: tuple[int, ...]) -> dict[str, LinearLayer]:
    """The experts of a 3-D tensor [E, out, in] ([E, in, out] transposed), one layer per row of its first axis."""
    count, rows, columns = shape
    d_in, d_out = (rows, columns) if experts.transposed else (columns, rows)
    wide = experts.d_inner if parts[0] == "down_proj" else experts.d_model
    if count < experts.count or d_in != wide:
        return {}
    slots = [experts.slot(e, parts[0]) for e in range(experts.count)]  # (rows past them: no expert's, averaged)
    return {slot: LinearLayer(slot, key, None, d_in, d_out, experts.transposed, e) for e, slot in enumerate(slots)}


def _fused_parts(model: nn.Module) -> dict[str, tuple[Experts, tuple[str, ...]]]:
    """Each 3-D expert parameter -> its experts and the projections fused in it, in order."""
    out = {}
    for experts in expert_modules(model):
        inner = ("gate_proj", "up_proj") if experts.gated else ("up_proj",)
        out[f"{experts.module}.{'gate_up_proj' if experts.gated else 'up_proj'}"] = (experts, inner)
        out[f"{experts.module}.down_proj"] = (experts, ("down_proj",))
    return out


Rules = tuple[list, list, list]
"""transformers' conversion rules for a class: its renamings, its many-to-one fusions and its one-to-many splits
along the rows (`_conversion_rules`)."""


def _conversion_rules(model: nn.Module) -> Rules:
    """transformers' conversion tables for the class: its renamings (WeightRenaming and kinds of it, such as
    Inkling-2's index offsets), its fusions of several keys into one and its splits of one key into several
    parameters by rows (WeightConverter: Lara-mini's linear_attn.in_proj); all empty if their API moves (only exact
    names then count)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Split, WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(model)
        renamings = [rule for rule in mapping if isinstance(rule, WeightRenaming)]
        converters = [rule for rule in mapping if type(rule) is WeightConverter]
        fusions = [rule for rule in converters if len(rule.target_patterns) == 1]
        splits = [
            rule
            for rule in converters
            if len(rule.source_patterns) == 1 and len(rule.target_patterns) > 1
            if [(type(op), getattr(op, "dim", None)) for op in rule.operations] == [(Split, 0)]
        ]
        return renamings, fusions, splits
    except Exception:  # best effort: exact names are still matched
        return [], [], []


def split_parameters(model: nn.Module, keys: list[str]) -> dict[str, list[str]]:
    """Checkpoint key -> the parameters transformers splits it into by rows, in order (Lara-mini's
    linear_attn.in_proj.weight -> in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), for keys it splits."""
    renamings, _, splits = _conversion_rules(model)
    state = set(model.state_dict())
    out = {}
    for key in keys:
        name = key
        for rule in renamings:
            name = rule.rename_source_key(name)[0]
        for rule in splits:
            first, source = rule.rename_source_key(name)
            targets = [first.replace(rule.target_patterns[0], target) for target in rule.target_patterns]
            if source is not None and all(t in state for t in targets):
                out[key] = targets
                break
    return out


def split_layers(linears: dict[str, LinearLayer], splits: dict[str, list[str]]) -> dict[str, LinearLayer]:
    """The linear layers with each checkpoint tensor that loads split into several layers' weights as one layer
    (their rows stacked, named after the first): they read one input, so solving the stacked rows is solving each."""
    out = dict(linears)
    for key, targets in splits.items():
        modules = [t.removesuffix(".weight") for t in targets]
        layers = [out.get(m) for m in modules]
        if not all(t.endswith(".weight") for t in targets) or any(la is None for la in layers):
            continue
        if any(la.bias_key or la.transposed or la.expert is not None for la in layers):
            continue
        for m in modules:
            del out[m]
        out[modules[0]] = LinearLayer(modules[0], key, None, layers[0].d_in, sum(la.d_out for la in layers), False)
    return out


def _loaded_name(key: str, rules: Rules) -> tuple[str, int | None]:
    """Checkpoint key `key` as transformers names it on loading (every renaming in turn, then the first fusion that
    matches, each by the rule's own matching), and its place among that fusion's sources (Mixtral's w1 is 0, w3 is
    1; None where no fusion matches)."""
    renamings, fusions, _ = rules
    for rule in renamings:
        key = rule.rename_source_key(key)[0]
    for rule in fusions:
        name, source = rule.rename_source_key(key)
        if source is not None:
            return name, rule.source_patterns.index(source)
    return key, None
