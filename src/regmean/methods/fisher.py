"""Fisher-weighted averaging: W = sum_i c_i F_i W_i / sum_i c_i F_i, elementwise (diagonal Fisher F_i).

With `normalize`, each F_i is first divided by its L2 norm over every parameter its file covers, so that a model
whose Fisher is larger overall (a less confident model, or one measured on harder data) does not outweigh the others
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regmean.errors import RegmeanError
from regmean.measure.fisher import FISHER, FisherFile
from regmean.methods.average import weighted_average
from regmean.methods.base import Cost, ElementwiseMethod, Step, TensorInputs, TensorStep
from regmean.recipe_model import RecipeModel

EPS = 1e-30  # only breaks 0/0: a parameter no model's Fisher touches is simply averaged


class FisherOptions(RecipeModel):
    normalize: bool = False


def fisher_norm(fisher: FisherFile) -> float:
    """The L2 norm of one model's whole Fisher diagonal (every parameter in its file), in float64."""
    total = sum(float(fisher.get(key).to(torch.float64).square().sum()) for key in fisher.keys)
    if total <= 0:
        raise RegmeanError(f"{fisher.path}: the Fisher is zero everywhere; it cannot be normalized (measure again)")
    return total**0.5


def fisher_average(tensors: torch.Tensor, weights: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    w = weights.to(torch.float64).reshape(-1, *([1] * (tensors.dim() - 1)))
    f = fisher.to(torch.float64) * w + EPS
    return (f * tensors.to(torch.float64)).sum(0) / f.sum(0)


@dataclass
class FisherInputs(TensorInputs):
    fisher: torch.Tensor | None = None
    """The K Fisher diagonals, stacked; None when some model has none for this tensor (then averaged)."""


class Fisher(ElementwiseMethod):
    name = "fisher"
    title = "Fisher-weighted averaging"
    citations = ("Matena and Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv:2111.09832).",)
    options = FisherOptions
    statistics = FISHER

    def __init__(self, inputs, device: str = "cpu"):
        super().__init__(inputs, device)
        self.fisher_weights = self.weights
        """The weights c_i of the Fisher terms (divided by each Fisher's norm once planned, with `normalize`)."""

    @classmethod
    def check(cls, inputs) -> list[str]:
        """Every Fisher file covers tensors of its model, each with its shape."""
        problems = []
        for fisher, ckpt in zip(inputs.stats, inputs.models, strict=True):
            unknown = [k for k in fisher.keys if k not in ckpt]
            bad = [k for k in fisher.keys if k in ckpt and fisher.shape(k) != ckpt.shapes[k]]
            if unknown:
                problems.append(
                    f"{fisher.path}: Fisher of {unknown[0]}, which the model lacks ({len(unknown)} unknown); "
                    "measure again"
                )
            elif bad:
                problems.append(
                    f"{fisher.path}: Fisher of {bad[0]} is {fisher.shape(bad[0])}, the model's is {ckpt.shapes[bad[0]]}"
                )
        return problems

    def cost(self, numel: int, element_bytes: int, readers: int) -> Cost:
        """The Fisher diagonals are read as well; tensors and diagonals are stacked in float64."""
        return Cost(2 * readers * numel * element_bytes, 8 * (3 * readers + 2) * numel, float(3 * readers * numel))

    def plan(self) -> list[Step]:
        """With `normalize`, each model's Fisher is divided by its norm (every Fisher read once, before any step)."""
        if self.settings.normalize:
            norms = torch.tensor([fisher_norm(f) for f in self.inputs.stats], dtype=torch.float64)
            self.fisher_weights = self.weights / norms
        return super().plan()

    def load(self, step: TensorStep) -> FisherInputs:
        data = super().load(step)
        fisher = [f.get(step.key, step.rows) for f in self.inputs.stats]
        stacked = torch.stack(fisher) if all(f is not None for f in fisher) else None
        return FisherInputs(data.tensors, data.base, data.base_missing, fisher=stacked)

    def merge_tensor(self, step: TensorStep, data: FisherInputs) -> torch.Tensor:
        if data.fisher is None:
            return weighted_average(data.tensors, self.weights)
        return fisher_average(torch.stack(list(data.tensors)), self.fisher_weights, data.fisher)
