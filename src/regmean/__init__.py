"""regmean: dataless knowledge fusion. Measure statistics, merge fine-tuned models, evaluate.

stats = regmean.measure(model_dir, examples)       # per owner, on private data
regmean.save_statistics(stats, "stats/")           # shareable safetensors file
regmean.merge("merge.yaml", "merged/")             # K models + K statistics files -> one model folder
regmean.evaluate(["merged/", "a/", "b/"], "test.jsonl")   # scored side by side (models or LoRA adapters)

The names below are imported on first use, so that `import regmean` (and the `regmean` command) starts without
loading torch and transformers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = {
    "Example": ("regmean.io.data", "Example"),
    "MergeConfig": ("regmean.merge", "MergeConfig"),
    "RegmeanError": ("regmean.errors", "RegmeanError"),
    "Statistics": ("regmean.stats", "Statistics"),
    "StatisticsFile": ("regmean.stats", "StatisticsFile"),
    "combine": ("regmean.combine", "combine"),
    "load_examples": ("regmean.io.data", "load_examples"),
    "measure": ("regmean.measure", "measure"),
    "merge": ("regmean.merge", "merge"),
    "save_statistics": ("regmean.measure.card", "save_statistics"),
    "evaluate": ("regmean.evaluate", "evaluate"),
    "MergeReport": ("regmean.merge.report", "MergeReport"),
    "MergeSummary": ("regmean.merge.report", "MergeSummary"),
    "Protection": ("regmean.measure.protect", "Protection"),
}
__all__ = [*_API, "__version__"]


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'regmean' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`regmean.measure`, `regmean.merge` and `regmean.evaluate` stay the functions once their modules are imported
    (the import system would bind those names to the modules)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _API.get(name, ("", ""))[0] == value.__name__:
            value = getattr(value, _API[name][1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
