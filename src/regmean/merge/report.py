"""What a merge did, for merge_report.json and the model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from regmean.methods.base import Computed, LayerReport, OutputNote


@dataclass(frozen=True)
class MergeSummary:
    """What the layers solved from statistics say in all (zeros and None for a data-free merge)."""

    solved_layers: int
    """Linear layers solved from statistics (RegMean's, RegMean++'s systems)."""
    ridge_layers: int
    """Of those, the ones whose system needed a ridge."""
    mean_relative_error: float | None
    """Mean over layers and models of the relative reconstruction error on the model's own statistics."""
    max_relative_error: float | None
    max_error_stderr: float | None
    """The largest standard error of an error estimated from sampled output rows."""
    sampled_layers: int
    """Layers whose diagnostics are estimates from sampled rows."""
    max_residual: float | None
    """The largest relative residual of a solved system."""


@dataclass
class MergeReport:
    method: str
    title: str = ""
    """How the method calls itself in words (`MergeMethod.title`)."""
    citations: tuple[str, ...] = ()
    """What the card asks users to cite (`MergeMethod.citations`)."""
    layers: list[LayerReport] = field(default_factory=list)
    """Per linear layer solved from statistics: module, site, ridge, relative reconstruction error per model."""
    averaged: dict[str, str] = field(default_factory=dict)
    """Data-aware methods: every matrix (ndim >= 2) of the body they did not solve, with why it was averaged."""
    base_missing: list[str] = field(default_factory=list)
    """Methods on task vectors: tensors the base model lacks (averaged)."""
    notes: list[str] = field(default_factory=list)
    """Lines the method adds to the model card's diagnostics."""
    data: list[dict] = field(default_factory=list)
    """Per model, what a method that measures while merging read: data file name, fields, examples, tokens."""
    warnings: list[str] = field(default_factory=list)
    """What the user should look at (console, card): e.g. one model carrying most of the Grams' weight."""
    output_notes: list[OutputNote] = field(default_factory=list)
    """What the output wrote otherwise than merged (an adapter: each layer's truncation, tensors left at the base's)."""

    @classmethod
    def of_steps(cls, method, results: dict[int, Computed]) -> MergeReport:
        """The report of the steps' diagnostics in step order (whichever process ran them), completed by the
        method."""
        report = cls(method.name, method.title or method.name, method.citations)
        for number in sorted(results):
            report.add(results[number])
        method.finish(report)
        return report

    def add(self, computed: Computed) -> None:
        self.layers += computed.layers
        self.base_missing += computed.base_missing
        self.output_notes += computed.notes

    def adapter_lines(self) -> list[str]:
        """An adapter output in words: what its rank lost (relative error of the update, in each layer's metric),
        and how far the merge moved the tensors the adapter leaves at the base's."""
        low_rank = [n for n in self.output_notes if n.kind.startswith("lora")]
        lines = []
        if low_rank:
            errors = sorted(n.relative for n in low_rank)
            worst = max(low_rank, key=lambda n: n.relative)
            metric = sum(n.kind != "lora" for n in low_rank)
            lines.append(
                f"adapter: {len(low_rank)} layers at rank {max(n.rank for n in low_rank)}"
                f" ({metric} in their own solved system's metric); relative error of the update: median "
                f"{errors[len(errors) // 2]:.3g}, largest {worst.relative:.3g} ({worst.tensor})"
            )
        moved: dict[str, list[float]] = {}
        for n in self.output_notes:
            if n.kind == "kept base":
                moved.setdefault(n.tensor, [0.0, 0.0])
                moved[n.tensor][0] += n.lost
                moved[n.tensor][1] += n.total
        for tensor, (lost, total) in moved.items():
            change = (lost / total) ** 0.5 if total > 0 else 0.0
            lines.append(f"left at the base's in the adapter: {tensor} (the merge moved it by {change:.3g}, relative)")
        return lines

    def summary(self) -> MergeSummary:
        errs = [e for row in self.layers for e in row.relative_error if e is not None]  # (None: no output at all)
        stderrs = [e for row in self.layers for e in row.error_stderr]
        return MergeSummary(
            solved_layers=len(self.layers),
            ridge_layers=sum(1 for row in self.layers if row.ridge > 0),
            mean_relative_error=sum(errs) / len(errs) if errs else None,
            max_relative_error=max(errs) if errs else None,
            max_error_stderr=max(stderrs) if stderrs else None,
            sampled_layers=sum(1 for row in self.layers if row.sampled),
            max_residual=max((row.residual for row in self.layers), default=None),
        )

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "summary": asdict(self.summary()),
            "layers": [row.to_dict() for row in self.layers],
            "averaged": self.averaged,
            "base_missing": self.base_missing,
            "notes": self.notes,
            "data": self.data,
            "warnings": self.warnings,
            "output_notes": [note.to_dict() for note in self.output_notes],
        }


def diagnostic(value: float | None, digits: int = 3) -> str:
    """A summary's error, or why there is none (every solved layer's outputs zero on its models' own inputs)."""
    return "undefined (no output on the models' inputs)" if value is None else f"{value:.{digits}g}"
