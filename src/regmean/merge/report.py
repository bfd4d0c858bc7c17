"""What a merge did, for merge_report.json and the model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from regmean.methods.base import Computed, LayerReport


@dataclass(frozen=True)
class MergeSummary:
    """What the layers solved from statistics say in all (zeros and None for a data-free merge)."""

    regmean_layers: int
    """Linear layers solved from statistics."""
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

    @classmethod
    def of_steps(cls, method, results: dict[int, Computed]) -> MergeReport:
        """The report of the steps' diagnostics in step order (whichever process ran them), completed by the
        method."""
        report = cls(method.name)
        for number in sorted(results):
            report.add(results[number])
        method.finish(report)
        return report

    def add(self, computed: Computed) -> None:
        self.layers += computed.layers
        self.base_missing += computed.base_missing

    def summary(self) -> MergeSummary:
        errs = [e for row in self.layers for e in row.relative_error]
        stderrs = [e for row in self.layers for e in row.error_stderr]
        return MergeSummary(
            regmean_layers=len(self.layers),
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
        }
