"""What a merge method is: what it reads, the steps it plans, and how it loads and computes each step.

The engine (`regmean.merge.engine`) knows only this interface. It asks the method for its steps, loads the next
step's inputs on a reader thread while the current one computes, writes what each step returns and reports
progress. A method that merges every tensor entry by entry (average, task arithmetic, TIES, DARE, Fisher) subclasses
`ElementwiseMethod` and writes `merge_tensor` (and, if it reads more than the K tensors and the base's, `load`);
RegMean adds steps that solve the layers sharing an input site from their statistics.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel

from regmean.architecture import is_head_key
from regmean.devices import Stager
from regmean.dtypes import itemsize
from regmean.statistic import Statistic
from regmean.vocabulary import merge_added_rows

if TYPE_CHECKING:
    from regmean.merge.inputs import MergeInputs
    from regmean.merge.report import MergeReport

BLOCK_BYTES = 16 * 1024**2
"""Plain tensors larger than this (per input) are merged a block of rows at a time, read and written in place."""


def row_blocks(shape: tuple[int, ...], element_bytes: int) -> list[tuple[int, int]] | None:
    """The [start, stop) row blocks a large tensor is merged in, or None to merge it whole."""
    size = math.prod(shape) * element_bytes
    if size <= BLOCK_BYTES or len(shape) < 2:
        return None
    step = max(1, BLOCK_BYTES // (size // shape[0]))
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


@dataclass(frozen=True)
class Cost:
    read_bytes: int
    """Raw inputs the step reads: what the reader thread holds while the previous step computes."""
    working_bytes: int
    """Memory while the step computes (its inputs promoted, intermediates, the result)."""
    flops: float = 0.0
    streamed_bytes: int = 0
    """Read a block at a time inside the step, never held whole (e.g. TIES' threshold passes)."""
    unpacked_bytes: int = 0
    """What the raw inputs grow by once loaded (format-2 Grams unpacked to whole matrices): held, not read."""


@dataclass(frozen=True, kw_only=True)
class Step:
    """One unit of merging: output tensors computed together (whole, or the same block of rows of each)."""

    outputs: tuple[str, ...]
    cost: Cost
    rows: tuple[int, int] | None = None


@dataclass(frozen=True, kw_only=True)
class TensorStep(Step):
    """One tensor, or one block of its rows, merged entry by entry from the K inputs."""

    key: str
    added_rows: bool = False
    """The rows of tokens only some models have (a grown vocabulary): averaged over those models."""


@dataclass
class TensorInputs:
    tensors: list[torch.Tensor]
    """The K models' tensor (or row block)."""
    base: torch.Tensor | None
    """The base model's, where the method or the recipe reads it; None where the base model lacks the tensor."""
    base_missing: bool = False
    owners: list[int] | None = None
    """For added rows: the models whose rows `tensors` are (those that have any row of the step)."""


@dataclass(frozen=True)
class LayerReport:
    """Diagnostics of one linear layer solved from statistics."""

    module: str
    site: str
    ridge: float
    relative_error: list[float | None]
    """Per model: tr((W - W_i) G_i (W - W_i)^T) / tr(W_i G_i W_i^T), on the checked rows."""
    bias: str
    error_stderr: list[float] = field(default_factory=list)
    """Per model: the standard error of relative_error as an estimate from sampled rows (0: every row checked)."""
    checked_rows: int = 0
    """Output rows the diagnostics were computed on."""
    sampled: bool = False
    """The diagnostics are estimates from a sample of the output rows (not every row)."""
    residual: float = 0.0
    """The site's relative residual ||A E - R|| / ||R|| on the checked rows."""
    diagnostics_seconds: float = 0.0
    """Time spent on this layer's diagnostics (errors and residual)."""
    tensor: str = ""
    """The checkpoint key of the solved weight (an expert's own tensor, where `module` names the expert)."""
    gram_share: list[float] = field(default_factory=list)
    """Per model: its part of the trace of the weighted sum of Grams (how much the solve leans on it)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class OutputNote:
    """What an output writer says of a tensor it wrote differently from the merge's value (a low-rank update: the
    energy its truncation lost; a tensor left at the base's: how far the merge had moved it)."""

    tensor: str
    kind: str
    rank: int
    lost: float
    """Squared norm of what the output lacks (in the layer's metric for a low-rank update)."""
    total: float
    """Squared norm it is relative to (the whole update; the base's tensor)."""

    @property
    def relative(self) -> float:
        return (self.lost / self.total) ** 0.5 if self.total > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Computed:
    """What a step produced: output tensors (row blocks starting at `first_row` if set) and diagnostics."""

    tensors: dict[str, torch.Tensor]
    first_row: int | None = None
    layers: list[LayerReport] = field(default_factory=list)
    base_missing: list[str] = field(default_factory=list)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weight key -> the Cholesky factor of the system the method solved it with (its metric: a low-rank output
    is best in it)."""
    notes: list[OutputNote] = field(default_factory=list)
    """What the output writer said of the step's tensors."""


class MergeMethod(ABC):
    """A merge method bound to the inputs of one merge. Class attributes say what it reads, before any input is
    opened: its options, whether it needs the base model, and which statistics each model must have."""

    name: ClassVar[str]
    title: ClassVar[str] = ""
    """How the console, the report and the card name it (its `name` if empty)."""
    citations: ClassVar[tuple[str, ...]] = ()
    """What the card asks users to cite, each a paragraph of Markdown (a BibTeX block, a reference)."""
    options: ClassVar[type[BaseModel]]
    needs_base: ClassVar[bool] = False
    statistics: ClassVar[Statistic | None] = None
    """The statistic it reads for every model (`statistics:` in the recipe), if any."""
    needs_data: ClassVar[bool] = False
    """Whether it measures each model on that model's data (`data:` in the recipe) while merging."""

    per_model_options: ClassVar[frozenset[str]] = frozenset()
    """Options a recipe may set per model (`models[i].options`)."""
    splits_across_processes: ClassVar[bool] = True
    """Whether its steps are independent, so that processes can share them (`merge --nproc`, torchrun)."""
    runs_on_device: ClassVar[bool] = False
    """Whether its steps compute on an accelerator (`merge --device`); methods without it merge on the CPU."""
    merges_grown_vocabularies: ClassVar[bool] = False
    """Whether it merges models whose vocabularies differ by added tokens (its tensor steps read their rows)."""

    def __init__(self, inputs: MergeInputs, device: str = "cpu"):
        self.inputs = inputs
        self.stage = Stager(device)
        """Moves a step's input tensors to the compute device (on the reader thread)."""
        self.settings = inputs.config.method_options()
        self.model_settings = [inputs.config.model_options(m) for m in inputs.config.models]
        """Each model's options (the recipe's, with its own per-model values)."""
        self.weights = torch.tensor([m.weight for m in inputs.config.models], dtype=torch.float64)

    @classmethod
    def check(cls, inputs: MergeInputs) -> list[str]:
        """Problems found from headers alone (shapes, widths, counts), reported with every other before any
        tensor is read."""
        return []

    @abstractmethod
    def plan(self) -> list[Step]:
        """Every step, in order; together their outputs are every body tensor of the output."""

    @abstractmethod
    def load(self, step: Step) -> object:
        """The step's inputs, read from disk (on the reader thread)."""

    @abstractmethod
    def compute(self, step: Step, data) -> Computed:
        """The step's output tensors, from what `load` returned."""

    def restore(self, step: Step, read: Callable[[str], torch.Tensor]) -> None:  # noqa: B027 (stateless: nothing)
        """A resumed merge skips `step`, finished by the interrupted run; a method that keeps state across steps
        (RegMean++'s working model) takes the step's outputs back, `read(key)` giving each as written."""

    def resident_bytes(self) -> int:
        """Memory the method holds through the whole merge, beyond its steps' (RegMean++: its working model),
        estimated from headers: checked against --max-memory before `plan` loads anything."""
        return 0

    def describe(self, steps: list[Step]) -> str:
        """What the plan line says about this method's work, beyond tensor counts and bytes."""
        return ""

    def finish(self, report: MergeReport) -> None:  # noqa: B027 (optional: most methods add nothing)
        """Add what only the whole merge knows to the report."""


class ElementwiseMethod(MergeMethod):
    """Every tensor merged entry by entry from the K inputs (and the base model's): one step per tensor, or per
    block of rows of a large one. Integer buffers are copied; `embeddings: base` / `lm_head: base` take the base
    model's tensor."""

    @abstractmethod
    def merge_tensor(self, step: TensorStep, data: TensorInputs) -> torch.Tensor:
        """The merged floating tensor (or row block), in at least float32."""

    def plan(self) -> list[Step]:
        return [step for key in self.inputs.body_keys() for step in self.tensor_steps(key)]

    def tensor_steps(self, key: str) -> list[TensorStep]:
        first, vocab = self.inputs.models[0], self.inputs.vocab
        shape, size = first.shapes[key], itemsize(first.dtype(key))
        readers = len(self.inputs.models) + (1 if self.reads_base(key) else 0)
        grown = vocab is not None and key in vocab.keys
        if grown:  # rows every model has, merged as usual, then the added rows
            shape = (vocab.shared, *shape[1:])
        whole = key in self.inputs.exact_keys  # (an adapter output factors it whole)
        blocks: list[tuple[int, int] | None] = (None if whole else row_blocks(shape, size)) or [
            (0, shape[0]) if grown else None
        ]
        steps = []
        for rows in blocks:
            numel = math.prod(shape) if rows is None else (rows[1] - rows[0]) * math.prod(shape[1:])
            steps.append(TensorStep(outputs=(key,), cost=self.cost(numel, size, readers), rows=rows, key=key))
        if grown:
            numel = (vocab.total - vocab.shared) * math.prod(shape[1:])
            added = (vocab.shared, vocab.total)
            steps.append(
                TensorStep(outputs=(key,), cost=self.cost(numel, size, readers), rows=added, key=key, added_rows=True)
            )
        return steps

    def cost(self, numel: int, element_bytes: int, readers: int) -> Cost:
        """Of merging `numel` entries read from `readers` tensors: the inputs, promoted, and the result."""
        return Cost(readers * numel * element_bytes, 8 * (readers + 2) * numel, float(readers * numel))

    def reads_base(self, key: str) -> bool:
        return self.inputs.base is not None and (self.needs_base or self.from_base(key))

    def from_base(self, key: str) -> bool:
        """Whether the recipe takes `key` from the base model (embeddings: base, or lm_head: base)."""
        config, inputs = self.inputs.config, self.inputs
        return (config.embeddings == "base" and is_head_key(key, inputs.embeddings)) or bool(
            config.lm_head == "base" and inputs.lm_head and is_head_key(key, [inputs.lm_head])
        )

    def load(self, step: TensorStep) -> TensorInputs:
        inputs = self.inputs
        if step.added_rows:  # from the models that have any of these rows, as many as each has
            start, rows = step.rows[0], inputs.vocab.rows
            owners = [k for k, m in enumerate(inputs.models) if rows[k] > start]
            tensors = [inputs.models[k].get(step.key, (start, rows[k])) for k in owners]
            return TensorInputs(self.stage(tensors), None, owners=owners)
        data = TensorInputs(self.stage([m.get(step.key, step.rows) for m in inputs.models]), None)
        if self.reads_base(step.key):
            name = inputs.base_key(step.key)
            data.base_missing = name is None and (step.rows is None or step.rows[0] == 0)  # reported once
            data.base = None if name is None else self.stage([inputs.base.get(name, step.rows)])[0]
        return data

    def compute(self, step: TensorStep, data: TensorInputs) -> Computed:
        first_row = None if step.rows is None else step.rows[0]
        first = data.tensors[0]
        if not first.is_floating_point():  # integer buffers (position ids): identical across fine-tunes
            return Computed({step.key: first}, first_row)
        out_dtype = self.inputs.output_dtype(step.key, first.dtype)
        missing = [step.key] if data.base_missing else []
        if data.base is not None and self.from_base(step.key):
            return Computed({step.key: data.base.to(out_dtype)}, first_row, base_missing=missing)
        if step.added_rows:
            vocab = self.inputs.vocab
            owned = zip(data.owners, data.tensors, strict=True)
            tokens = [min(max(0, vocab.tokens[k] - first_row), t.shape[0]) for k, t in owned]
            count = vocab.total - first_row
            merged = merge_added_rows(data.tensors, data.owners, tokens, self.weights, count, vocab.source)
            return Computed({step.key: merged.to(out_dtype)}, first_row)
        merged = self.merge_tensor(step, data).to(out_dtype)
        return Computed({step.key: merged}, first_row, base_missing=missing)
