"""Task arithmetic: the base model plus a scaled sum of task vectors (W_i - W_base)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from regmean.errors import RegmeanError
from regmean.methods.average import weighted_average
from regmean.methods.base import ElementwiseMethod, TensorInputs, TensorStep
from regmean.recipe_model import RecipeModel


class TaskArithmeticOptions(RecipeModel):
    scaling: float = 1.0
    """lambda in W_base + lambda * sum_i w_i (W_i - W_base)."""


def task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor, scaling: float
) -> torch.Tensor:
    """base + scaling * sum_i w_i (T_i - base), as (1 - scaling sum_i w_i) base + sum_i scaling w_i T_i,
    accumulated one input at a time in at least float32."""
    coef = (scaling * weights.to(torch.float64)).tolist()
    work = torch.promote_types(base.dtype, torch.float32)
    if not all(abs(c) < torch.finfo(work).max for c in [*coef, 1.0 - sum(coef)]):
        raise RegmeanError(f"task_arithmetic: scaling {scaling:g} times the weights overflows {work}; scale them down")
    out = base.to(work, copy=True).mul_(1.0 - sum(coef))
    for t, c in zip(tensors, coef, strict=True):
        out.add_(t, alpha=c)
    return out


class TaskVectorMethod(ElementwiseMethod):
    """Methods that combine task vectors (W_i - W_base). A tensor the base model lacks (a fine-tuned head) has
    no task vector: it is averaged."""

    needs_base = True

    def merge_tensor(self, step: TensorStep, data: TensorInputs) -> torch.Tensor:
        if data.base is None:
            return weighted_average(data.tensors, self.weights)
        return self.merge_task_vectors(step, data)

    @abstractmethod
    def merge_task_vectors(self, step: TensorStep, data: TensorInputs) -> torch.Tensor:
        """The merged tensor (or row block) from the K fine-tuned ones and the base model's (never None here)."""


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    title = "task arithmetic"
    citations = ("Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089).",)
    options = TaskArithmeticOptions

    def merge_task_vectors(self, step: TensorStep, data: TensorInputs) -> torch.Tensor:
        return task_arithmetic(data.tensors, self.weights, data.base, self.settings.scaling)
