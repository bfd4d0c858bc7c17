"""The merge step: recipe -> validated inputs -> merged tensors -> model folder(s)."""

from regmean.merge.config import MergeConfig, ModelEntry
from regmean.merge.engine import merge
from regmean.merge.report import MergeReport

__all__ = ["MergeConfig", "MergeReport", "ModelEntry", "merge"]
