"""Which modules a LoRA adapter may touch, as peft decides it when it loads the adapter: the modules its config
targets (target_modules, exclude_modules), the ones it saves whole (modules_to_save), and whether a module stores
its weight as [in, out] (transformers' Conv1D: peft sets fan_in_fan_out for it whatever the config says, and
ignores the flag on nn.Linear)."""

from __future__ import annotations

from pathlib import Path

from regmean.errors import RegmeanError
from regmean.io.untrusted import compile_pattern


def conv1d_modules(base: Path) -> set[str]:
    """Names of the base model's Conv1D modules (its module tree on the meta device; no weight read)."""
    from transformers.pytorch_utils import Conv1D

    from regmean.architecture import meta_model

    return {name for name, module in meta_model(base).named_modules() if isinstance(module, Conv1D)}


def _matches(module: str, spec, where: str) -> bool:
    """peft's rule: a string is a regular expression the whole module name must match; a list names modules by
    their last components."""
    if spec == "all-linear":  # peft's shorthand: every linear layer (but the output layer)
        return True
    if isinstance(spec, str):
        return compile_pattern(spec, where).fullmatch(module) is not None
    return any(module == t or module.endswith("." + t) for t in spec or [])


def check_targets(config_file: Path, config: dict, adapted: list[str], saved: list[str], base: set[str]) -> None:
    """Every module the adapter's tensors adapt is one its config targets and does not exclude; every module of
    the base (`base`: its module names) it says it saves whole has its tensors in the file (peft could not load the
    adapter otherwise; names the base lacks, such as the `score` peft adds for classifiers, are not asked for)."""
    if config.get("layers_to_transform") is not None:
        raise RegmeanError(
            f"{config_file}: layers_to_transform is not supported; merge the adapter into its model first (peft's "
            "merge_and_unload) and give that folder"
        )
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    for name, spec in (("target_modules", targets), ("exclude_modules", excluded)):
        if spec is not None and not (isinstance(spec, str) or all(isinstance(t, str) for t in spec)):
            raise RegmeanError(f"{config_file}: {name} must be a pattern or a list of module names")
    for module in adapted:
        if targets is not None and not _matches(module, targets, f"{config_file}: target_modules"):
            raise RegmeanError(f"{config_file}: the adapter's tensors adapt {module}, which target_modules leaves out")
        if excluded and _matches(module, excluded, f"{config_file}: exclude_modules"):
            raise RegmeanError(f"{config_file}: the adapter's tensors adapt {module}, which exclude_modules excludes")
    for name in config.get("modules_to_save") or []:
        in_base = any(module == name or module.endswith("." + name) for module in base)
        if in_base and not any(module == name or module.endswith("." + name) for module in saved):
            raise RegmeanError(
                f"{config_file}: modules_to_save names {name}, but the adapter holds none of its tensors (peft "
                "could not load it); save the adapter again"
            )
