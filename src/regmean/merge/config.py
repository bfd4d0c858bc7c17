"""The merge recipe (YAML or Python), validated before any tensor is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from regmean.errors import RegmeanError
from regmean.methods import METHODS


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    """A Hugging Face model folder (config.json + safetensors)."""
    statistics: Path | None = None
    """Its statistics folder or file (required by regmean)."""
    weight: float = Field(1.0, gt=0)
    """Relative weight of this model (normalised for averages; multiplies its Gram for regmean)."""


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "regmean"
    models: list[ModelEntry] = Field(min_length=1)
    base_model: Path | None = None
    """The pretrained model the others were fine-tuned from (task_arithmetic)."""
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Method options: regmean {alpha, gram_weighting, bias}; task_arithmetic {scaling}."""
    heads: Literal["merge", "keep"] = "merge"
    """merge: heads merged like the body (same label space); keep: one output per model, each with its own head."""
    head_modules: list[str] | None = None
    """Regular expressions naming head modules; by default every top-level module beside the base model."""
    embeddings: Literal["average", "base"] = "average"
    """Input embeddings: merged by the method's plain rule (average), or taken from base_model."""
    lm_head: Literal["average", "base", "regmean"] = "average"
    """An untied LM head (output embeddings): averaged, taken from base_model, or RegMean with its input's Gram."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Output dtype; auto keeps each tensor's input dtype."""
    allow_pickle: bool = False
    """Read pytorch_model.bin checkpoints (with torch.load(weights_only=True)). Off: pickle can run code."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @field_validator("options")
    @classmethod
    def _method_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = METHODS.get(info.data.get("method", ""))
        if method is None:
            return v
        try:
            return method.options(**v).model_dump()
        except ValidationError as exc:
            raise ValueError("; ".join(_one_line(method.name, e) for e in exc.errors())) from None

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        method = METHODS[self.method]
        if method.needs_base and self.base_model is None:
            raise ValueError(f"method {self.method} needs base_model")
        if "base" in (self.embeddings, self.lm_head) and self.base_model is None:
            raise ValueError("embeddings: base and lm_head: base need base_model")
        if method.statistics:
            missing = [str(m.path) for m in self.models if m.statistics is None]
            if missing:
                raise ValueError(f"method {self.method} needs statistics for every model; missing for {missing}")
        return self

    def method_options(self) -> BaseModel:
        return METHODS[self.method].options(**self.options)

    @classmethod
    def from_file(cls, path: str | Path) -> MergeConfig:
        """Read YAML; relative paths are resolved against the config file's folder."""
        path = Path(path)
        if not path.is_file():
            raise RegmeanError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RegmeanError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise RegmeanError(f"{path}: expected a mapping with method, models, options")
        return cls.parse(raw, source=str(path), root=path.parent)

    @classmethod
    def parse(cls, raw: dict, source: str = "config", root: Path | None = None) -> MergeConfig:
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:  # with the missing files, so that every problem is reported at once
            problems = [_one_line(source, e) for e in exc.errors()]
            raise RegmeanError(problems + _missing_paths(raw, root or Path("."))) from exc
        return config.resolved(root) if root is not None else config

    def resolved(self, root: Path) -> MergeConfig:
        def fix(p: Path | None) -> Path | None:
            return None if p is None or p.is_absolute() else (root / p)

        data = self.model_copy(deep=True)
        for m in data.models:
            m.path = fix(m.path) or m.path
            m.statistics = fix(m.statistics) or m.statistics
        data.base_model = fix(data.base_model) or data.base_model
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _missing_paths(raw: dict, root: Path) -> list[str]:
    """The model, statistics and base-model paths of an unvalidated recipe that do not exist."""
    entries = [m for m in raw.get("models") or [] if isinstance(m, dict)]
    named = [m.get(key) for m in entries for key in ("path", "statistics")] + [raw.get("base_model")]
    paths = [root / p for p in named if isinstance(p, str | Path)]
    return [f"{p}: not found" for p in paths if not p.exists()]


def _one_line(source: str, error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ())) or "(top level)"
    msg = error.get("msg", "invalid")
    if error.get("type") == "extra_forbidden":
        msg = "unknown key (check its spelling against the documented options)"
    return f"{source}: {where}: {msg}"
