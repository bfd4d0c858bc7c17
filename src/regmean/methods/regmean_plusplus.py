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
from typing import Literal

import torch

from regmean.architecture import is_head_key
from regmean.dtypes import FLOATS, itemsize
from regmean.errors import RegmeanError
from regmean.io.data import load_examples
from regmean.loading import load_model, load_tokenizer
from regmean.measure.accumulate import Accumulator
from regmean.measure.batching import Batch, make_batches
from regmean.measure.sites import detect_sites, select_modules
from regmean.methods.base import Computed, Cost, Step
from regmean.methods.regmean import RegMean, RegMeanOptions, SiteInputs, SiteStep
from regmean.methods.stages import Stage, forward_stages
from regmean.stats import SiteStats

ACTIVATION_COPIES = 16
"""Activations a forward pass holds at once, in rows x width floats (an estimate for the plan)."""


class RegMeanPlusPlusOptions(RegMeanOptions):
    stats_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the Gram sums (the forward pass runs in float32)."""


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
    record: dict
    """Provenance for the model card: the data file's name, fields, examples, tokens, max_length."""


def model_data(entry, model: torch.nn.Module) -> ModelData:
    """A model's data (its recipe entry's `data`), tokenised by its own tokenizer into batches for `model`."""
    spec = entry.data
    fields = {"text_field": spec.text_field, "text_pair_field": spec.text_pair_field, "target_field": spec.target_field}
    examples = load_examples(spec.file, max_examples=spec.max_examples, **fields)
    tokenizer = load_tokenizer(entry.path)
    batches = list(make_batches(examples, tokenizer, model, spec.batch_size, spec.max_length, "cpu"))
    tokens = sum(int(b.masks["input"].sum()) for b in batches)
    record = {"data": spec.file.name, **{k: v for k, v in fields.items() if v}}
    return ModelData(batches, {**record, "examples": len(examples), "tokens": tokens, "max_length": spec.max_length})


class RegMeanPlusPlus(RegMean):
    name = "regmean_plusplus"
    options = RegMeanPlusPlusOptions
    statistics = None
    needs_data = True

    @classmethod
    def check(cls, inputs) -> list[str]:
        """Every model's data readable, with its fields and at least one example; its tokenizer loadable."""
        skeleton = inputs.skeleton
        seq2seq_lm = getattr(skeleton.config, "is_encoder_decoder", False) and hasattr(
            skeleton, "prepare_decoder_input_ids_from_labels"
        )
        problems = []
        for entry in inputs.config.models:
            spec = entry.data
            if seq2seq_lm and spec.target_field is None:
                problems.append(
                    f"{spec.file}: {type(skeleton).__name__} is an encoder-decoder LM; name the decoder targets' "
                    "column in the recipe (data: target_field)"
                )
                continue
            try:
                load_examples(spec.file, spec.text_field, spec.text_pair_field, spec.target_field, 1)
                load_tokenizer(entry.path)
            except RegmeanError as exc:
                problems += exc.problems
        return problems

    def plan(self) -> list[Step]:
        """Load the working model (the first model, in float32) and every model's data; find the sites in one
        forward pass; then every unsolved tensor's averaging step, then the stages in forward order."""
        entries = self.inputs.config.models
        self.model = load_model(entries[0].path, "cpu", torch.float32)
        self.params = self.model.state_dict(keep_vars=True)
        self.data = [model_data(entry, self.model) for entry in entries]
        sites = detect_sites(self.model, self._measured_modules(), self.data[0].batches[0])
        prefix_params, prefixes = 0, []
        self.stage_steps = []
        for stage in forward_stages(self.model, sites):
            step, params = self._stage_step(stage, prefix_params)
            prefix_params += params
            prefixes.append(prefix_params)
            self.stage_steps.append(step)
        self.full_passes = sum(prefixes) / max(1, prefix_params)
        """Forward work per candidate, in passes through every stage (stage s runs the prefix up to s)."""
        solved = {key for step in self.stage_steps for key in step.outputs}
        averaged = [s for key in self.inputs.body_keys() if key not in solved for s in self.tensor_steps(key)]
        return averaged + self.stage_steps

    def _measured_modules(self) -> list[str]:
        """Linear modules solved: as RegMean's (heads only with heads: merge; the LM head only with lm_head:
        regmean), all of them measured."""
        inputs, config = self.inputs, self.inputs.config
        names = select_modules(self.model, None, None)[0]
        keep = config.heads == "keep"
        names = [n for n in names if not (keep and is_head_key(inputs.linears[n].weight_key, inputs.heads))]
        return [n for n in names if n != inputs.lm_head or config.lm_head == "regmean"]

    def _gram_bytes(self) -> int:
        return FLOATS[self.settings.stats_dtype].itemsize

    def _stage_step(self, stage: Stage, prefix_params: int) -> tuple[StageStep, int]:
        """The stage's step and the count of weights it adds to the prefix that each later pass runs through."""
        k, first = len(self.inputs.models), self.inputs.models[0]
        solves = []
        for site in stage.sites:
            layers = [self.inputs.linears[m] for m in site.modules]
            solves.append(self._site_step((site.name,) * k, layers))
        outputs = tuple(key for solve in solves for key in solve.outputs)
        swap = tuple(key for key in self.inputs.body_keys() if stage.block and key.startswith(stage.block))
        read = set(swap) | set(outputs)
        numel = sum(math.prod(first.shapes[key]) for key in read)
        tokens = sum(d.record["tokens"] for d in self.data)
        rows = max(b.masks["input"].numel() for d in self.data for b in d.batches)
        widest = max(site.d for site in stage.sites)
        grams = k * sum((site.d + 1) ** 2 for site in stage.sites) * self._gram_bytes()
        solve_working = max(solve.cost.working_bytes for solve in solves)
        forward_flops = 2.0 * tokens * (prefix_params + numel)
        gram_flops = 2.0 * tokens * sum(site.d**2 for site in stage.sites)
        cost = Cost(
            k * sum(math.prod(first.shapes[key]) * itemsize(first.dtype(key)) for key in read),
            grams + 4 * numel + solve_working + 4 * ACTIVATION_COPIES * rows * widest,
            forward_flops + gram_flops + sum(solve.cost.flops for solve in solves),
        )
        return StageStep(outputs=outputs, cost=cost, stage=stage, swap=swap, solves=tuple(solves)), numel

    def describe(self, steps: list[Step]) -> str:
        stages = [s for s in steps if isinstance(s, StageStep)]
        layers = sum(len(solve.layers) for s in stages for solve in s.solves)
        k, tokens = len(self.inputs.models), sum(d.record["tokens"] for d in self.data)
        return (
            f"RegMean++: {layers} layers in {len(stages)} stages; {k * len(stages)} forward passes, each stopped after "
            f"its stage, over {tokens:,} tokens of the models' data (the work of about {self.full_passes:.1f} full "
            "passes over each model's data)"
        )

    def load(self, step: Step):
        if not isinstance(step, StageStep):
            return super().load(step)
        keys = list(dict.fromkeys(step.swap + step.outputs))
        return StageInputs([{key: model.get(key) for key in keys} for model in self.inputs.models])

    def compute(self, step: Step, data) -> Computed:
        if not isinstance(step, StageStep):
            out = super().compute(step, data)
            self._install(out.tensors, out.first_row)
            return out
        merged = {key: self.params[key].detach().clone() for key in step.swap if key in self.params}
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
            out.layers += part.layers
        self._install(out.tensors)
        return out

    def stage_grams(self, stage: Stage, batches: list[Batch]) -> dict[str, SiteStats]:
        """The stage's site sums over `batches` through the working model as it stands."""
        acc = Accumulator(self.model, list(stage.sites), FLOATS[self.settings.stats_dtype], "cpu")
        acc.pass_over(batches)
        return acc.stats

    def _install(self, tensors: dict[str, torch.Tensor], first_row: int | None = None) -> None:
        """Copy tensors (or row blocks starting at `first_row`) into the working model."""
        with torch.no_grad():
            for key, value in tensors.items():
                target = self.params.get(key)
                if target is None:  # a checkpoint entry the class does not use: no effect on the forward pass
                    continue
                if first_row is not None:
                    target = target[first_row : first_row + value.shape[0]]
                target.copy_(value)

    def finish(self, report) -> None:
        solved = {layer.module for step in self.stage_steps for solve in step.solves for layer in solve.layers}
        body = set(self.inputs.body_keys())
        linears = self.inputs.linears.items()
        report.averaged_linears = sorted(n for n, la in linears if n not in solved and la.weight_key in body)
        k, stages = len(self.inputs.models), len(self.stage_steps)
        report.notes.append(
            f"RegMean++: Grams measured during the merge through the merged prefix, {stages} stages in forward "
            f"order, {k * stages} truncated forward passes over the models' own data"
        )
        report.data = [d.record for d in self.data]
