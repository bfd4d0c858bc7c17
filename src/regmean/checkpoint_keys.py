"""How a checkpoint's keys map onto a model class's parameters, as transformers loads them: its renamings
(legacy LayerNorm.gamma, GPT-NeoX's embed_out), its fusions of several keys into one parameter (per-expert keys
into 3-D experts) and its splits of one key into several by rows (Lara-mini's linear_attn.in_proj); and the linear
layers each merge solves, named by the checkpoint's own keys, so that outputs are written in the checkpoint's
layout."""

from __future__ import annotations

from torch import nn

from regmean.architecture import Experts, LinearLayer, expert_modules


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
