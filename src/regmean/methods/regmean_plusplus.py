"""RegMean++ (arXiv 2508.03121): RegMean with each layer's Grams measured on inputs that the already merged layers
before it produce, and candidate i's own block for the layers inside it.

The statistics cannot be measured in advance, so the merge measures them: stage by stage in forward order (see
`regmean.methods.stages`), on one working model in memory. Every tensor that is not solved is averaged first. For
each stage, each candidate's tensors of the stage's block are swapped in, the model runs over that candidate's own
data until the stage's last site has read its input (measure's `Accumulator`: the same padding masks, one Gram per
shared input), the block's merged tensors are put back, and the stage's layers are solved by RegMean and written
into the working model. Stage s costs K forward passes truncated after it: about K (S + 1) / 2 full passes in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from regmean.architecture import expert_slots
from regmean.checkpoint_keys import parameter_names
from regmean.dtypes import FLOATS, itemsize
from regmean.errors import RegmeanError
from regmean.io.chat import render_chat
from regmean.io.data import DATA_FIELDS, load_examples
from regmean.loading import load_adapted, load_tokenizer, tokenizer_folder
from regmean.measure.accumulate import Accumulator
from regmean.measure.batching import Batch, make_batches
from regmean.measure.sites import detect_sites, select_modules
from regmean.methods.base import Computed, Cost, Step
from regmean.methods.coverage import absent_weights, averaged_matrices, summarize
from regmean.methods.regmean import (
    RegMean,
    RegMeanOptions,
    SiteInputs,
    SiteStep,
    solvable,
)
from regmean.methods.stages import Stage, forward_stages
from regmean.statistic import ProvenanceRecord
from regmean.stats import SiteStats
from regmean.stats_checks import Stream

if TYPE_CHECKING:
    from regmean.merge.config import ModelEntry
    from regmean.merge.inputs import MergeInputs
    from regmean.merge.report import MergeReport

ACTIVATION_COPIES = 16
"""Activations a forward pass holds at once, in rows x width floats (an estimate for the plan)."""


class RegMeanPlusPlusOptions(RegMeanOptions):
    stats_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the Gram sums (the forward pass runs in float32)."""
    verify_grams: bool = False
    """The Grams are measured here, from the data, not read from anyone's file: nothing to prove."""


@dataclass(frozen=True, kw_only=True)
class StageStep(Step):
    """Measure one stage's sites through the merged prefix for every candidate, then solve its layers."""

    stage: Stage
    swap: tuple[str, ...]
    """The block's tensors, replaced by each candidate's own while that candidate is measured."""
    solves: tuple[SiteStep, ...]


@dataclass
class StageInputs:
    tensors: list[dict[str, torch.Tensor]]
    """Per model: its tensors of the stage (the block's, and the solved layers' weights and joint biases)."""


@dataclass
class ModelData:
    batches: list[Batch]
    record: ProvenanceRecord
    """Provenance for the model card: the data file's name, fields, examples, tokens, max_length."""


def model_data(entry: ModelEntry, folders: tuple[Path, ...], model: nn.Module) -> ModelData:
    """A model's data (its recipe entry's `data`), tokenised by its own tokenizer into batches for `model`'s class
    (the meta-device skeleton will do: only its config and signature are read)."""
    spec = entry.data
    fields = {name: getattr(spec, name) for name in DATA_FIELDS}
    examples = load_examples(spec.file, max_examples=spec.max_examples, **fields)
    folder = tokenizer_folder(folders)
    tokenizer = load_tokenizer(folder)
    examples, formatting = render_chat(examples, tokenizer, folder)
    try:
        batches = list(make_batches(examples, tokenizer, model, spec.batch_size, spec.max_length, "cpu"))
    except RegmeanError as exc:  # the skeleton is the first model's: name this entry's (the same architecture)
        first = str(getattr(model.config, "_name_or_path", "") or "")
        said = [p.replace(f"{first}/config.json", f"{entry.path}/config.json") if first else p for p in exc.problems]
        raise RegmeanError(said) from None
    tokens = sum(b.tokens for b in batches)
    chat = {"formatting": formatting} if formatting else {}
    record = {"data": spec.file.name, **{k: v for k, v in fields.items() if v}, **chat}
    return ModelData(batches, {**record, "examples": len(examples), "tokens": tokens, "max_length": spec.max_length})


class RegMeanPlusPlus(RegMean):
    runs_on_device = False  # its working model and forward passes run on the CPU
    splits_across_processes = False  # each stage runs through the stages merged before it
    merges_grown_vocabularies = False  # its working model has one model's vocabulary
    name = "regmean_plusplus"
    title = "RegMean++"
    citations = (*RegMean.citations, "and RegMean++ (arXiv:2508.03121, https://arxiv.org/abs/2508.03121).")
    options = RegMeanPlusPlusOptions
    statistics = None
    needs_data = True

    @classmethod
    def check(cls, inputs: MergeInputs) -> list[str]:
        """Every model has the weights of the layers to solve; its data reads, tokenises and fits the model."""
        problems = []
        layers = [layer for name, layer in inputs.linears.items() if solvable(inputs, name)]
        for entry, ckpt in zip(inputs.config.models, inputs.models, strict=True):
            absent = absent_weights(entry, ckpt, layers)
            problems += [absent] if absent else []
            try:
                model_data(entry, ckpt.folders, inputs.skeleton)
            except RegmeanError as exc:  # each problem named by the data file it arose on (and any file it names)
                data = str(entry.data.file)
                problems += [p if p.startswith(data) else f"{data}: {p}" for p in exc.problems]
        return problems

    def resident_bytes(self) -> int:
        """The working model, in float32."""
        first = self.inputs.models[0]
        return sum(
            4 * math.prod(shape) for key, shape in first.shapes.items() if first.dtype(key).startswith(("F", "BF"))
        )

    def plan(self) -> list[Step]:
        """Tokenise every model's data; load the working model (the first model, in float32) and find its sites in
        one forward pass; then every unsolved tensor's averaging step, then the stages in forward order."""
        entries = self.inputs.config.models
        models = self.inputs.models
        self.data = [model_data(e, m.folders, self.inputs.skeleton) for e, m in zip(entries, models, strict=True)]
        self.model = load_adapted(models[0], "cpu", torch.float32)
        self.params = self.model.state_dict(keep_vars=True)
        self.names = self._working_names()
        experts = expert_slots(self.model)  # not yet solved through the merged prefix: averaged, and said
        modules = [
            n for n in select_modules(self.model, None, None)[0] if n not in experts and solvable(self.inputs, n)
        ]
        sites = detect_sites(self.model, modules, self.data[0].batches[0])
        prefix_params, prefixes = 0, []
        self.stage_steps = []
        for stage in forward_stages(self.model, sites):
            step, params = self._stage_step(stage, prefix_params)
            prefix_params += params
            prefixes.append(prefix_params)
            self.stage_steps.append(step)
        # forward work per candidate, in passes through every stage (stage s runs the prefix up to s)
        self.full_passes = sum(prefixes) / max(1, prefix_params)
        solved = {key for step in self.stage_steps for key in step.outputs}
        averaged = [s for key in self.inputs.body_keys() if key not in solved for s in self.tensor_steps(key)]
        return averaged + self.stage_steps

    def _working_names(self) -> dict[str, str]:
        """Checkpoint key -> the working model's name for it (the same, or as transformers renames it on loading:
        legacy LayerNorm.gamma, a missing base-model prefix). A key the class does not use has none."""
        first = self.inputs.models[0]
        names = parameter_names(self.model, first.keys())
        return {  # one-to-one only: a key fused with others on loading is not one parameter
            key: name
            for key, name in names.items()
            if name in self.params and self.params[name].shape == first.shape(key)
        }

    def _gram_bytes(self) -> int:
        return FLOATS[self.settings.stats_dtype].itemsize

    def _stored_gram_bytes(self, sites: tuple[str, ...]) -> int:
        return 0  # measured in memory, never read

    def _stage_step(self, stage: Stage, prefix_params: int) -> tuple[StageStep, int]:
        """The stage's step and the count of weights it adds to the prefix that each later pass runs through."""
        k, first = len(self.inputs.models), self.inputs.models[0]
        solves = []
        for site in stage.sites:
            layers = [self.inputs.linears[m] for m in site.modules]
            solves.append(self._site_step((site.name,) * k, layers))
        outputs = tuple(key for solve in solves for key in solve.outputs)
        block = stage.block
        swap = tuple(key for key in self.inputs.body_keys() if block and self.names.get(key, "").startswith(block))
        read = set(swap) | set(outputs)
        numel = sum(math.prod(first.shapes[key]) for key in read)
        tokens = sum(d.record["tokens"] for d in self.data)
        rows = max(b.masks[Stream.INPUT].numel() for d in self.data for b in d.batches)
        widest = max(site.d for site in stage.sites)
        grams = k * sum((site.d + 1) ** 2 for site in stage.sites) * self._gram_bytes()
        solve_working = max(solve.cost.working_bytes for solve in solves)
        forward_flops = 2.0 * tokens * (prefix_params + numel)
        gram_flops = 2.0 * tokens * sum(site.d**2 for site in stage.sites)
        read_bytes = k * sum(math.prod(first.shapes[key]) * itemsize(first.dtype(key)) for key in read)
        cost = Cost(
            read_bytes,  # the K models' block, held while the next stage's is read
            read_bytes + grams + 4 * numel + solve_working + 4 * ACTIVATION_COPIES * rows * widest,
            forward_flops + gram_flops + sum(solve.cost.flops for solve in solves),
        )
        return StageStep(outputs=outputs, cost=cost, stage=stage, swap=swap, solves=tuple(solves)), numel

    def describe(self, steps: list[Step]) -> str:
        stages = [s for s in steps if isinstance(s, StageStep)]
        layers = sum(len(solve.layers) for s in stages for solve in s.solves)
        k, tokens = len(self.inputs.models), sum(d.record["tokens"] for d in self.data)
        solved = {layer.module for s in stages for solve in s.solves for layer in solve.layers}
        averaged = summarize(averaged_matrices(self.inputs, solved, self._expert_reasons()))
        return (
            f"RegMean++: {layers} layers in {len(stages)} stages; {k * len(stages)} forward passes, each stopped after "
            f"its stage, over {tokens:,} tokens of the models' data (the work of about {self.full_passes:.1f} full "
            "passes over each model's data)" + (f"; {averaged}" if averaged else "")
        )

    def load(self, step: Step) -> object:
        if not isinstance(step, StageStep):
            return super().load(step)
        keys = list(dict.fromkeys(step.swap + step.outputs))
        return StageInputs([{key: model.get(key) for key in keys} for model in self.inputs.models])

    def compute(self, step: Step, data: object) -> Computed:
        if not isinstance(step, StageStep):
            out = super().compute(step, data)
            self._install(out.tensors, out.first_row)
            return out
        merged = {key: self.params[self.names[key]].detach().clone() for key in step.swap}
        measured = []
        for own, tensors in zip(self.data, data.tensors, strict=True):
            self._install({key: tensors[key] for key in step.swap})
            measured.append(self.stage_grams(step.stage, own.batches))
        self._install(merged)
        out = Computed({})
        for solve in step.solves:
            params = [{key: tensors[key] for key in solve.outputs} for tensors in data.tensors]
            part = super().compute(solve, SiteInputs([grams[solve.sites[0]] for grams in measured], params))
            out.tensors.update(part.tensors)
            out.metrics.update(part.metrics)
            out.layers += part.layers
        self._install(out.tensors)
        return out

    def restore(self, step: Step, read) -> None:
        """The finished step's merged tensors back into the working model (as `compute` installed them)."""
        self._install({key: read(key) for key in step.outputs}, step.rows[0] if step.rows else None)

    def stage_grams(self, stage: Stage, batches: list[Batch]) -> dict[str, SiteStats]:
        """The stage's site sums over `batches` through the working model as it stands."""
        acc = Accumulator(self.model, list(stage.sites), FLOATS[self.settings.stats_dtype], "cpu")
        acc.pass_over(batches)
        return acc.stats

    def _install(self, tensors: dict[str, torch.Tensor], first_row: int | None = None) -> None:
        """Copy tensors (or row blocks starting at `first_row`), by checkpoint key, into the working model."""
        with torch.no_grad():
            for key, value in tensors.items():
                if key not in self.names:  # a checkpoint entry the class does not use: no effect on the forward pass
                    continue
                target = self.params[self.names[key]]
                if first_row is not None:
                    target = target[first_row : first_row + value.shape[0]]
                target.copy_(value)

    def finish(self, report: MergeReport) -> None:
        solved = {layer.module for step in self.stage_steps for solve in step.solves for layer in solve.layers}
        report.averaged = averaged_matrices(self.inputs, solved, self._expert_reasons())
        k, stages = len(self.inputs.models), len(self.stage_steps)
        report.notes.append(
            f"RegMean++: Grams measured during the merge through the merged prefix, {stages} stages in forward "
            f"order, {k * stages} truncated forward passes over the models' own data"
        )
        report.data = [d.record for d in self.data]

    def _expert_reasons(self) -> dict[str, str]:
        return dict.fromkeys(expert_slots(self.model), "expert (RegMean++ does not measure experts yet)")
