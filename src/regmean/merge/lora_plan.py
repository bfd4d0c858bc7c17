"""What a merge written as one LoRA adapter (`output: {lora: {rank: r}}`) holds, decided from headers alone.

Every tensor the inputs change goes somewhere said: the weight of a linear layer becomes a rank-r update over the
base's (`lora_A`, `lora_B`; its bias, when changed, `lora_B.bias`: peft's `lora_bias`); any other module whose
tensors change (a head, a norm, an expert block) is saved whole (`modules_to_save`); input and output embeddings
that change stay the base's (peft cannot save a tied embedding faithfully), which the plan, the report and the card
say. An adapter input changes the tensors its file holds; a full model is taken to change every tensor.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from regmean.architecture import LinearLayer, is_head_key
from regmean.dtypes import STORED
from regmean.errors import RegmeanError
from regmean.heads import head_kind
from regmean.io.adapter import SAVED_PREFIX, AdaptedCheckpoint
from regmean.io.checkpoint import Checkpoint
from regmean.io.writer import Layout

if TYPE_CHECKING:
    from regmean.merge.inputs import MergeInputs


@dataclass(frozen=True)
class LoraTarget:
    """One linear layer written as a low-rank update of the base's weight."""

    layer: LinearLayer
    base_key: str
    rank: int
    """min(the adapter's rank, d_out, d_in): a narrower layer keeps its full rank (exact)."""
    bias_base_key: str | None = None
    """The base's bias, where the merge changes the layer's bias (written as lora_B.bias)."""

    @property
    def prefix(self) -> str:
        return f"{SAVED_PREFIX}{self.layer.module}"


@dataclass
class AdapterPlan:
    base: Checkpoint
    rank: int
    dtype: torch.dtype
    """The LoRA tensors' dtype (float32 unless the recipe names one)."""
    targets: dict[str, LoraTarget] = field(default_factory=dict)
    """Checkpoint key of a weight -> its low-rank update."""
    biases: dict[str, LoraTarget] = field(default_factory=dict)
    """Checkpoint key of a changed bias of a target -> that target."""
    saved: dict[str, str] = field(default_factory=dict)
    """Checkpoint key -> its name in the adapter, for every tensor of a module saved whole."""
    saved_modules: list[str] = field(default_factory=list)
    kept_base: dict[str, str] = field(default_factory=dict)
    """Changed embedding tensors the adapter leaves at the base's (said in the plan, report and card) -> the base's
    name for them."""

    @property
    def exact_keys(self) -> frozenset[str]:
        """The merged tensors the adapter is computed from: needed whole and unrounded (at least float32)."""
        return frozenset(self.targets) | frozenset(self.biases)

    def describe(self) -> str:
        kept = f"; left at the base's (embeddings): {', '.join(self.kept_base)}" if self.kept_base else ""
        saved = f"; {len(self.saved_modules)} modules saved whole" if self.saved_modules else ""
        return f"LoRA adapter of rank {self.rank}: {len(self.targets)} linear layers{saved}{kept}"


def plan_adapter(inputs: MergeInputs, rank: int) -> AdapterPlan:
    """Where every changed tensor of the merge goes in the adapter (see the module's docstring)."""
    base = adapter_base(inputs)
    config = inputs.config
    dtype = torch.float32 if config.dtype == "auto" else config.output_dtype(torch.float32)
    plan = AdapterPlan(base, rank, dtype)
    changed = changed_keys(inputs)
    weights = {layer.weight_key: layer for layer in inputs.linears.values() if layer.expert is None}
    tied_or_embedding = inputs.embeddings + ([inputs.lm_head] if inputs.lm_head else [])
    for key in [k for k in inputs.models[0].keys() if k in changed]:
        layer, base_key = weights.get(key), _base_key(inputs, base, key)
        if layer is not None and not is_head_key(key, inputs.heads) and base_key is not None:
            plan.targets[key] = _target(inputs, base, layer, base_key, rank, changed)
            if plan.targets[key].bias_base_key is not None:
                plan.biases[layer.bias_key] = plan.targets[key]
    whole: list[str] = []
    for key in inputs.models[0].keys():
        if key not in changed or key in plan.targets or key in plan.biases:
            continue
        base_key = _base_key(inputs, base, key)
        if is_head_key(key, tied_or_embedding) and not is_head_key(key, inputs.heads) and base_key:
            plan.kept_base[key] = base_key
        else:
            whole.append(inputs.module_of(key))
    _bias_rule(plan, inputs, whole)
    plan.saved_modules = list(dict.fromkeys(whole))
    _check_nesting(plan)
    for key in inputs.models[0].keys():
        if inputs.module_of(key) in plan.saved_modules and key not in plan.targets and key not in plan.biases:
            plan.saved[key] = SAVED_PREFIX + inputs.parameter_names.get(key, key)
    if not plan.targets and not plan.saved:
        raise RegmeanError("output.lora: the inputs change no tensor of the base model; there is nothing to adapt")
    return plan


def _bias_rule(plan: AdapterPlan, inputs: MergeInputs, whole: list[str]) -> None:
    """peft's lora_bias is one flag for every target (a target without a bias cannot fold it): used only when every
    target's bias changes; otherwise the layers whose bias changes are saved whole instead."""
    if not plan.biases or len(plan.biases) == len(plan.targets):
        return
    for bias, target in list(plan.biases.items()):
        del plan.targets[target.layer.weight_key], plan.biases[bias]
        whole.append(target.layer.module)


def _check_nesting(plan: AdapterPlan) -> None:
    """A module saved whole may not hold a target, another saved module or a kept embedding (peft wraps it whole:
    the adapter would not load)."""
    inner = [t.layer.module for t in plan.targets.values()] + [k.rsplit(".", 1)[0] for k in plan.kept_base]
    for module in plan.saved_modules:
        clash = next((m for m in inner + plan.saved_modules if m != module and m.startswith(module + ".")), None)
        if clash is not None:
            raise RegmeanError(
                f"output.lora: module {module} would be saved whole, but it holds {clash}, which peft cannot adapt "
                "inside it; write a full model (drop output.lora)"
            )


def adapter_base(inputs: MergeInputs) -> Checkpoint:
    """The model the adapter applies to: base_model, or the one base every input adapter shares."""
    if inputs.base is not None:
        return inputs.base
    bases = {id(m.base): m.base for m in inputs.models if isinstance(m, AdaptedCheckpoint)}
    if len(bases) == 1 and all(isinstance(m, AdaptedCheckpoint) for m in inputs.models):
        return next(iter(bases.values()))
    raise RegmeanError(
        "output.lora writes an adapter over a base model: give base_model (the model the inputs were fine-tuned from)"
    )


def changed_keys(inputs: MergeInputs) -> set[str]:
    """Tensors some input changes: an adapter's LoRA pairs and saved tensors; every tensor of a full model; only
    floating tensors the model class loads (integer buffers are the same in every fine-tune, and a key the class
    does not place changes nothing)."""
    changed: set[str] = set()
    for model in inputs.models:
        if isinstance(model, AdaptedCheckpoint):
            changed |= set(model.pairs) | set(model.replaced)
        else:
            changed |= set(model.keys())
    first = inputs.models[0]
    changed = {k for k in changed if k in inputs.parameter_names and STORED[first.dtype(k)].is_floating_point}
    if inputs.vocab is not None:
        raise RegmeanError(
            "output.lora: the models' vocabularies differ (added tokens), which an adapter over one base cannot hold; "
            "write a full model (drop output.lora)"
        )
    return changed


def _base_key(inputs: MergeInputs, base: Checkpoint, key: str) -> str | None:
    """The base's name for `key` where it has the tensor in the same shape (else the module is saved whole)."""
    name = key if inputs.base is None else inputs.base_key(key)
    if name is None or name not in base or tuple(base.shape(name)) != tuple(inputs.models[0].shapes[key]):
        return None
    return name


def _target(inputs, base: Checkpoint, layer: LinearLayer, base_key: str, rank: int, changed: set[str]) -> LoraTarget:
    bias = layer.bias_key
    bias_base = _base_key(inputs, base, bias) if bias is not None and bias in changed else None
    if bias is not None and bias in changed and bias_base is None:
        raise RegmeanError(f"output.lora: the base model {base.path} lacks {bias}, which the merge changes")
    return LoraTarget(layer, base_key, min(rank, layer.d_out, layer.d_in), bias_base)


def adapter_layout(plan: AdapterPlan, inputs: MergeInputs, keys: list[str], own: Checkpoint) -> Layout:
    """The adapter's tensors, for the output folder whose merged tensors are `keys` (its own head's included, as
    model `own` has it: heads: keep copies each model's head as it is)."""
    layout: Layout = {}
    first, heads = inputs.models[0], set(inputs.head_keys())
    for key in keys:
        target = plan.targets.get(key)
        if target is not None:
            layout[f"{target.prefix}.lora_A.weight"] = (plan.dtype, (target.rank, target.layer.d_in))
            layout[f"{target.prefix}.lora_B.weight"] = (plan.dtype, (target.layer.d_out, target.rank))
        elif key in plan.biases:
            layout[f"{plan.biases[key].prefix}.lora_B.bias"] = (plan.dtype, (plan.biases[key].layer.d_out,))
        elif key in plan.saved and key in heads:
            layout[plan.saved[key]] = (STORED[own.dtype(key)], tuple(own.shapes[key]))
        elif key in plan.saved:
            stored = STORED[first.dtype(key)]
            dtype = inputs.config.output_dtype(stored) if stored.is_floating_point else stored
            layout[plan.saved[key]] = (dtype, tuple(first.shapes[key]))
    return layout


def adapter_config(plan: AdapterPlan, inputs: MergeInputs, saved_modules: list[str]) -> dict:
    """adapter_config.json as peft reads it: scale 1 (lora_alpha = r), every target named exactly."""
    architecture = inputs.models[0].architecture
    kind = head_kind(architecture)
    narrower = {t.layer.module: t.rank for t in plan.targets.values() if t.rank != plan.rank}
    pattern = {f"^{re.escape(module)}$": r for module, r in narrower.items()}
    return {
        "peft_type": "LORA",
        "task_type": kind and kind.peft_task,
        "base_model_name_or_path": os.path.abspath(plan.base.path),
        "r": plan.rank,
        "lora_alpha": plan.rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _target_modules(plan, inputs),
        "modules_to_save": saved_modules or None,
        "lora_bias": bool(plan.biases),
        "fan_in_fan_out": any(t.layer.transposed for t in plan.targets.values()),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_modules(plan: AdapterPlan, inputs: MergeInputs) -> list[str]:
    """The targets by their last names (q_proj, ...) where those name exactly the targets, else in full."""
    targets = {t.layer.module for t in plan.targets.values()}
    names = sorted({m.rsplit(".", 1)[-1] for m in targets})
    linears = {layer.module for layer in inputs.linears.values() if layer.expert is None}
    matched = {m for m in linears if m.rsplit(".", 1)[-1] in names}
    return names if matched == targets else sorted(targets)


def lora_bytes(plan: AdapterPlan) -> int:
    """Memory factoring the largest target takes: the float64 delta, its weighted copy, the SVD's factors."""
    sizes = [(t.layer.d_out, t.layer.d_in) for t in plan.targets.values()]
    return max((8 * (3 * o * i + 2 * min(o, i) ** 2 + i * i) for o, i in sizes), default=0)
