"""mergekit recipes read as ours: `merge_method`, `models[].model` (a folder, or `model+lora`), per-model and global
`parameters` (weight, density, normalize, lambda, rescale), `base_model`, `dtype`/`out_dtype` and `tokenizer_source`,
for the methods both tools have (linear, task_arithmetic, ties, dare_linear, dare_ties) with mergekit's defaults
(TIES and DARE keep every entry unless a density is given; DARE TIES sums the agreeing entries unless `normalize`).
What has no equivalent is refused in one line, never dropped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from regmean.errors import RegmeanError

METHODS = {
    "linear": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare_linear": ("dare", {"combine": "linear"}),
    "dare_ties": ("dare", {"combine": "ties"}),
}
"""mergekit's method -> ours and the options that make it the same merge."""
NORMALIZED = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}
"""mergekit's `normalize` default per method (divide by the weights' sum: by the agreeing ones' for TIES)."""
KEYS = {"merge_method", "models", "parameters", "base_model", "dtype", "out_dtype", "tokenizer_source"}
DATA_AWARE = "regmean's data-aware methods (regmean, regmean_plusplus) need recipes of regmean's own form"


def is_mergekit(raw: Any) -> bool:
    return isinstance(raw, dict) and "merge_method" in raw


def from_mergekit(raw: dict, source: str) -> dict:
    """Our recipe (unvalidated) for a mergekit one; RegmeanError naming what has no equivalent."""
    name = str(raw.get("merge_method", "")).lower()
    if name not in METHODS:
        shared = ", ".join(METHODS)
        raise RegmeanError(
            f"{source}: mergekit method {name!r} has no equivalent here (shared: {shared}; {DATA_AWARE})"
        )
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise RegmeanError(f"{source}: mergekit's {unknown[0]!r} has no equivalent here; remove it to merge")
    method, options = METHODS[name]
    shared = _parameters(raw.get("parameters") or {}, source, "parameters")
    base = _path(raw["base_model"], source) if raw.get("base_model") else None
    models, lora_base = [], None
    for number, entry in enumerate(raw.get("models") or []):
        where = f"models.{number}"  # numbered from 0, as our recipes' messages number them
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise RegmeanError(f"{source}: {where}: give `model: <folder>` (or `<folder>+<lora folder>`)")
        folder, plus, lora = entry["model"].partition("+")
        if plus and not (folder and lora):
            raise RegmeanError(f"{source}: {where}: {entry['model']!r}: give `<folder>+<lora folder>`, both named")
        if lora:
            lora_base = lora_base or folder
            if not _same_folder(folder, lora_base, source):
                raise RegmeanError(f"{source}: {where}: LoRA adapters over different bases ({lora_base}, {folder})")
        if method != "average" and base is not None and not lora and folder == base:
            continue  # mergekit reads the base model's entry as the base (a zero task vector)
        given = _parameters(entry.get("parameters") or {}, source, f"{where}.parameters")
        merge_wide = sorted(set(given) - {"weight", "density"})
        if merge_wide:
            raise RegmeanError(
                f"{source}: {where}: {merge_wide[0]!r} applies to the whole merge here: give it in the "
                "top-level parameters"
            )
        models.append(_model(lora or folder, {**shared, **given}, method))
    if base is not None and lora_base is not None and not _same_folder(base, lora_base, source):
        raise RegmeanError(
            f"{source}: the models apply LoRA adapters over {lora_base}, and base_model is {base}: here the adapters "
            "are applied over the merge's base model; give the same folder to both (or merge full models)"
        )
    return _recipe(raw, source, method, options, models, base or lora_base, shared, name)


def _same_folder(a: str, b: str, source: str) -> bool:
    """Whether two of the recipe's paths (relative to its folder) name one folder, however spelled."""
    root = Path(source).parent
    return os.path.realpath(root / a) == os.path.realpath(root / b)


def _recipe(
    raw: dict, source: str, method: str, options: dict, models: list[dict], base: str | None, shared: dict, name: str
) -> dict:
    """Our recipe from the translated models and mergekit's merge-wide parameters (`shared`)."""
    normalize = shared.pop("normalize", NORMALIZED[name])
    scaling = shared.pop("lambda", 1.0)
    if shared.pop("rescale", True) is not True:
        raise RegmeanError(f"{source}: DARE without rescaling has no equivalent here (kept entries are rescaled)")
    if normalize is not True and name in ("ties", "dare_ties", "linear"):  # ours divide by the (agreeing) weights
        raise RegmeanError(
            f"{source}: {name} with normalize: {normalize} has no equivalent here (regmean's divides by the weights "
            "of the entries it sums: set normalize: true for that merge)"
        )
    if normalize and name in ("task_arithmetic", "dare_linear"):  # divide by the weights' sum: scale the weights
        total = sum(m["weight"] for m in models)
        models = [{**m, "weight": m["weight"] / total} for m in models]
    recipe: dict = {"method": method, "models": models, "options": {**options}}
    if method != "average":
        recipe["options"]["scaling"] = scaling
    if base is not None:
        recipe["base_model"] = base
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        recipe["dtype"] = dtype
    tokenizer = raw.get("tokenizer_source")
    if tokenizer not in (None, "base"):
        raise RegmeanError(f"{source}: tokenizer_source {tokenizer!r} has no equivalent here (models' own or base)")
    return recipe


def _model(path: str, parameters: dict, method: str) -> dict:
    entry: dict = {"path": path, "weight": parameters.pop("weight", 1.0)}
    density = parameters.pop("density", 1.0)  # mergekit keeps every entry unless told
    if method == "ties":
        entry["options"] = {"density": density}
    elif method == "dare":
        entry["options"] = {"drop_rate": 1.0 - density}
    return entry


PARAMETERS = {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"}


def _parameters(values: Any, source: str, where: str) -> dict:
    """mergekit parameters we share, as plain values (int8_mask, a memory setting, changes nothing)."""
    if not isinstance(values, dict):
        raise RegmeanError(f"{source}: {where}: a mapping of parameter values")
    out = {}
    for key, value in values.items():
        if key not in PARAMETERS:
            raise RegmeanError(f"{source}: {where}: mergekit parameter {key!r} has no equivalent here")
        if isinstance(value, list | dict):
            raise RegmeanError(f"{source}: {where}.{key}: gradients and per-tensor values have no equivalent here")
        if key != "int8_mask":
            out[key] = value
    return out


def _path(value: Any, source: str) -> str:
    if not isinstance(value, str) or "+" in value:
        raise RegmeanError(f"{source}: base_model: give a model folder")
    return value
