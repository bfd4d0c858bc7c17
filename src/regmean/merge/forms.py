"""What a merge writes: model folders (the default), or one LoRA adapter over the base model (`output.lora`).

The engine asks its output form for the folders' layouts and writers; the form says what it adds to the plan line
and writes its own files beside the weights. The methods do not know which form they feed.
"""

from __future__ import annotations

import json
from pathlib import Path

from regmean.io.checkpoint import ADAPTER_CONFIG
from regmean.io.writer import Layout, ShardedWriter
from regmean.merge.files import COPIED_PATTERNS
from regmean.merge.inputs import MergeInputs
from regmean.merge.lora_plan import AdapterPlan, adapter_config, adapter_layout, lora_bytes, plan_adapter
from regmean.merge.lora_writer import LoraWriter
from regmean.merge.plan import output_layouts
from regmean.methods.base import MergeMethod

ADAPTER_SKIPPED = ("config.json", "generation_config.json")
"""Not copied into an adapter folder: peft loads the base's config (a config.json would make it a model folder)."""


class ModelFolders:
    """One model folder (heads: merge) or one per input model (heads: keep), in sharded safetensors."""

    kind = "model"
    copied_patterns = COPIED_PATTERNS

    def __init__(self, inputs: MergeInputs):
        self.inputs = inputs
        self.layouts: list[Layout] = output_layouts(inputs)

    def describe(self) -> str:
        return ""

    def working_bytes(self) -> int:
        """Memory the form's own work takes beside a step's (none: tensors are written as computed)."""
        return 0

    def resumable(self, method: MergeMethod) -> bool:
        return True

    def writers(self, folders: list[Path], shard_bytes: int, create: bool = True) -> list[ShardedWriter]:
        return [ShardedWriter(f, layout, shard_bytes, create) for f, layout in zip(folders, self.layouts, strict=True)]

    def finish_folder(self, folder: Path, k: int) -> None:
        """What the form writes into output folder `k` beside the weights and the shared files."""
        vocab = self.inputs.vocab
        if vocab is not None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab.total}, indent=2) + "\n")


class LoraAdapter(ModelFolders):
    """A peft LoRA adapter folder (one per input model with heads: keep, each saving its own head)."""

    kind = "adapter"
    copied_patterns = tuple(p for p in COPIED_PATTERNS if p not in ADAPTER_SKIPPED)

    def __init__(self, inputs: MergeInputs, rank: int):
        self.inputs = inputs
        self.plan: AdapterPlan = plan_adapter(inputs, rank)
        inputs.exact_keys = self.plan.exact_keys  # merged whole and unrounded: the factoring reads them
        folders = inputs.models if inputs.config.heads == "keep" else inputs.models[:1]
        keys = inputs.body_keys() + inputs.head_keys()
        self.layouts = [adapter_layout(self.plan, inputs, keys, model) for model in folders]
        self._factors: dict = {}

    def describe(self) -> str:
        return self.plan.describe()

    def working_bytes(self) -> int:
        return lora_bytes(self.plan)

    def resumable(self, method: MergeMethod) -> bool:
        """Not for a method that keeps state across steps (RegMean++ reads its finished steps back, which an
        adapter does not hold)."""
        return type(method).restore is MergeMethod.restore

    def writers(self, folders: list[Path], shard_bytes: int, create: bool = True) -> list[LoraWriter]:
        return [
            LoraWriter(f, layout, self.plan, self._factors, create)
            for f, layout in zip(folders, self.layouts, strict=True)
        ]

    def finish_folder(self, folder: Path, k: int) -> None:
        layout = self.layouts[k]
        saved = [m for m in self.plan.saved_modules if any(n in layout for n in self._names_of(m))]
        config = adapter_config(self.plan, self.inputs, saved)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def _names_of(self, module: str) -> list[str]:
        return [name for key, name in self.plan.saved.items() if self.inputs.module_of(key) == module]


def output_form(inputs: MergeInputs) -> ModelFolders:
    lora = inputs.config.output.lora
    return ModelFolders(inputs) if lora is None else LoraAdapter(inputs, lora.rank)
