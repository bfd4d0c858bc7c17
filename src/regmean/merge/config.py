"""The merge recipe (YAML or Python), validated before any tensor is read."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from regmean.dtypes import FLOATS
from regmean.errors import RegmeanError, check_path, one_line
from regmean.io.adapter import input_paths as adapter_inputs
from regmean.io.untrusted import compile_pattern, resolve_user_path
from regmean.merge.mergekit import from_mergekit, is_mergekit
from regmean.methods import METHODS
from regmean.recipe_model import RecipeModel
from regmean.stats_checks import MAX_LENGTH


def _no_nul(path: Path) -> Path:
    if "\0" in str(path):
        raise ValueError("a path may not contain a NUL character")
    return path


LocalPath = Annotated[Path, AfterValidator(_no_nul)]

MAX_LORA_RANK = 65536
"""The largest rank an adapter output may have (peft's own ranks are far smaller)."""


class DataSource(RecipeModel):
    """A model's own data, for a method that measures during the merge (regmean_plusplus); the fields mean what
    `regmean measure`'s options of the same names mean."""

    file: LocalPath
    text_field: str = "text"
    text_pair_field: str | None = None
    target_field: str | None = None
    messages_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    max_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=1, le=MAX_LENGTH)


class ModelEntry(RecipeModel):
    path: LocalPath
    """A Hugging Face model folder (config.json + safetensors), or a PEFT LoRA adapter folder over `base_model`."""
    statistics: LocalPath | None = None
    """Its statistics folder or file (required by regmean)."""
    data: DataSource | None = None
    """Its data (required by regmean_plusplus, which measures while it merges)."""
    weight: float = Field(1.0, gt=0)
    """Relative weight of this model (normalised for averages; multiplies its Gram for regmean)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """This model's own values of the method's per-model options (ties: density; dare: drop_rate)."""


class LoraOutput(RecipeModel):
    rank: int = Field(ge=1, le=MAX_LORA_RANK)
    """The adapter's rank r (a layer narrower than r keeps its full rank, exactly)."""


class OutputForm(RecipeModel):
    lora: LoraOutput | None = None
    """Write one peft LoRA adapter over the base model instead of a full model: each changed linear layer's merged
    update at rank r (RegMean's: best in its own system's metric), changed heads and norms saved whole."""


_PARSING: ContextVar[bool] = ContextVar("parsing_a_recipe", default=False)
"""Set while `MergeConfig.parse` validates a recipe (validation calls `__init__`, which otherwise reports alone)."""


class MergeConfig(RecipeModel):
    """A merge recipe. Built in Python (`MergeConfig(models=[...])`), a mistake is a RegmeanError as in a YAML file."""

    method: str = "regmean"
    models: list[ModelEntry] = Field(min_length=1)
    base_model: LocalPath | None = None
    """The pretrained model the others were fine-tuned from (task vectors: task_arithmetic, ties, dare)."""
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """The method's options (its `options` model in regmean.methods; the README lists them)."""
    heads: Literal["merge", "keep"] = "merge"
    """merge: heads merged like the body (same label space); keep: one output per model, each with its own head."""
    head_modules: list[str] | None = None
    """Regular expressions naming head modules; by default every top-level module beside the base model."""
    embeddings: Literal["average", "base"] = "average"
    """Input embeddings: merged by the method's plain rule (average), or taken from base_model."""
    lm_head: Literal["average", "base", "regmean"] = "average"
    """An untied LM head (output embeddings): averaged, taken from base_model, or RegMean with its input's Gram."""
    tokenizer_source: LocalPath | None = None
    """Models whose vocabularies grew by added tokens: the model (its path, as in `models`) whose rows added tokens
    take; by default each added row is averaged over the models that have it."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Output dtype; auto keeps each tensor's input dtype."""
    allow_pickle: bool = False
    """Read pytorch_model.bin checkpoints (with torch.load(weights_only=True)). Off: pickle can run code."""
    output: OutputForm = Field(default_factory=OutputForm)
    """What the merge writes: a full model folder (default), or `lora: {rank: r}`, one adapter over base_model."""

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, v: Any) -> Any:
        v = v.lower() if isinstance(v, str) else v  # method names are case-insensitive
        if isinstance(v, str) and v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @field_validator("models")
    @classmethod
    def _weights_sum(cls, v: list[ModelEntry]) -> list[ModelEntry]:
        if not math.isfinite(sum(m.weight for m in v)):
            raise ValueError("the models' weights must sum to a finite number (scale them down)")
        return v

    @field_validator("head_modules")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or []:
            try:
                compile_pattern(pattern, "head_modules")
            except RegmeanError as exc:
                raise ValueError(exc.problems[0].removeprefix("head_modules: ")) from None
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
        self._check_model_options()
        if method.needs_base and self.base_model is None:
            raise ValueError(f"method {self.method} needs base_model")
        if "base" in (self.embeddings, self.lm_head) and self.base_model is None:
            raise ValueError("embeddings: base and lm_head: base need base_model")
        if self.tokenizer_source is not None and self.tokenizer_source not in [m.path for m in self.models]:
            raise ValueError(f"tokenizer_source {str(self.tokenizer_source)!r} is not one of the models' paths")
        if method.statistics:
            missing = [str(m.path) for m in self.models if m.statistics is None]
            if missing:
                raise ValueError(
                    f"method {self.method} needs statistics for every model (from `{method.statistics.measured_by}`); "
                    f"missing for {missing}"
                )
        given = [str(m.path) for m in self.models if m.data is not None]
        if method.needs_data:
            missing = [str(m.path) for m in self.models if m.data is None]
            if missing:
                raise ValueError(
                    f"method {self.method} measures each model on its own data while merging: give every model "
                    f"`data: {{file: ...}}`; missing for {missing} (owners who cannot share data: use regmean)"
                )
        elif given:
            raise ValueError(f"method {self.method} reads no data; remove `data` from {given}")
        return self

    def input_paths(self) -> list[tuple[str, Path]]:
        """Every file or folder the merge reads, named by what it is (an output may not overlap any)."""
        paths = adapter_inputs([m.path for m in self.models], self.base_model)  # (an adapter's own base too)
        paths += [("statistics", m.statistics) for m in self.models if m.statistics is not None]
        return paths + [("data file", m.data.file) for m in self.models if m.data is not None]

    def _check_model_options(self) -> None:
        """Per-model options are the method's per-model ones, with values its options accept."""
        method = METHODS[self.method]
        for m in self.models:
            unknown = sorted(set(m.options) - method.per_model_options)
            if unknown:
                allowed = ", ".join(sorted(method.per_model_options)) or "none"
                raise ValueError(
                    f"{m.path}: {self.method} takes no per-model option {unknown[0]!r} (per model: {allowed})"
                )
            try:
                m.options = {k: v for k, v in self.model_options(m).model_dump().items() if k in m.options}
            except ValidationError as exc:
                raise ValueError("; ".join(_one_line(str(m.path), e) for e in exc.errors())) from None

    def method_options(self) -> BaseModel:
        return METHODS[self.method].options(**self.options)

    def model_options(self, entry: ModelEntry) -> BaseModel:
        """The method's options for one model: the recipe's, with that model's own where it gives them."""
        return METHODS[self.method].options(**{**self.options, **entry.options})

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a merged floating tensor stored as `dtype` is written in."""
        return dtype if self.dtype == "auto" else FLOATS[self.dtype]

    @classmethod
    def from_file(cls, path: str | Path) -> MergeConfig:
        """Read YAML; relative paths are resolved against the config file's folder."""
        check_path(path, "a recipe")
        path = Path(path)
        if not path.is_file():
            raise RegmeanError(f"{path}: config file not found")
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise RegmeanError(f"{path}: expected a mapping with method, models, options")
        if is_mergekit(raw):  # a mergekit recipe, read as the same merge in ours
            raw = from_mergekit(raw, str(path))
        return cls.parse(raw, source=str(path), root=path.parent)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if _PARSING.get():  # `parse` reports it with the recipe's name and the missing files
                raise
            raise RegmeanError([_one_line("MergeConfig", e) for e in exc.errors()]) from None

    @classmethod
    def parse(cls, raw: dict, source: str = "config", root: Path | None = None) -> MergeConfig:
        if not isinstance(raw, dict):
            raise RegmeanError(f"{source}: a recipe is a mapping (method, models, ...), not {type(raw).__name__}")
        parsing = _PARSING.set(True)
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:  # with the missing files, so that every problem is reported at once
            problems = [_one_line(source, e) for e in exc.errors()]
            raise RegmeanError(problems + _missing_paths(raw, root or Path("."))) from exc
        finally:
            _PARSING.reset(parsing)
        return config.resolved(root) if root is not None else config

    def resolved(self, root: Path) -> MergeConfig:
        """The recipe with its relative paths taken from `root` (the recipe's folder)."""
        data = self._with_paths(lambda p: p if p.is_absolute() else Path(os.path.normpath(root / p)))
        for what, path in data.input_paths() + [("tokenizer source", data.tokenizer_source)]:
            if path is not None:  # a symbolic link loop is refused now, not when a path is resolved mid-merge
                resolve_user_path(path, what)
        seen: dict[str, int] = {}
        for number, m in enumerate(data.models):  # numbered from 0, as every recipe message numbers them
            first = seen.setdefault(os.path.realpath(m.path), number)
            if first != number:  # merged at double weight without a word otherwise
                raise RegmeanError(
                    f"{m.path}: listed twice in the recipe (models {first} and {number}); give it once, with a weight"
                )
        return data

    def relative_to(self, folder: Path) -> MergeConfig:
        """The recipe with every path relative to `folder`, where it is written: it replays from there."""
        start = os.path.abspath(folder)
        return self._with_paths(lambda p: Path(os.path.relpath(os.path.abspath(p), start)))

    def _with_paths(self, change: Callable[[Path], Path]) -> MergeConfig:
        """A copy with `change` applied to every path the recipe names."""
        data = self.model_copy(deep=True)
        for m in data.models:
            m.path = change(m.path)
            m.statistics = m.statistics and change(m.statistics)
            if m.data is not None:
                m.data.file = change(m.data.file)
        data.base_model = data.base_model and change(data.base_model)
        data.tokenizer_source = data.tokenizer_source and change(data.tokenizer_source)
        return data

    def with_lora(self, rank: int) -> MergeConfig:
        """The recipe writing one LoRA adapter of `rank` (`merge --lora-rank`)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
            raise RegmeanError(f"LoRA rank {rank!r}: give a whole number from 1 to {MAX_LORA_RANK}")
        return self.model_copy(update={"output": OutputForm(lora=LoraOutput(rank=rank))})

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if self.output.lora is None:  # the default: a full model
            del data["output"]
        return yaml.safe_dump(data, sort_keys=False)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, and may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_RECIPE = 1024**2


def read_yaml(path: Path) -> object:
    """A recipe's YAML (safe, no duplicate keys, at most 1 MB); any error is one line with its position."""
    try:
        if path.stat().st_size > MAX_RECIPE:
            raise RegmeanError(f"{path}: a recipe of {path.stat().st_size} bytes is too large (at most 1 MB)")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RegmeanError(f"{path}: not valid YAML{where}: {one_line(problem, 200)}") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise RegmeanError(f"{path}: not a readable YAML text ({type(exc).__name__})") from None


def _missing_paths(raw: dict, root: Path) -> list[str]:
    """The model, statistics, data and base-model paths of an unvalidated recipe that do not exist."""
    models = raw.get("models")
    entries = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    named = [m.get(key) for m in entries for key in ("path", "statistics")] + [raw.get("base_model")]
    named += [m["data"].get("file") for m in entries if isinstance(m.get("data"), dict)]
    paths = [root / p for p in named if isinstance(p, str | Path)]
    return [f"{p}: not found" for p in paths if not p.exists()]


def _one_line(source: str, error: dict) -> str:
    where = one_line(".".join(str(p) for p in error.get("loc", ())), 100) or "(top level)"
    msg = one_line(error.get("msg", "invalid"), 300)
    if error.get("type") == "extra_forbidden":
        msg = "unknown key (check its spelling against the documented options)"
    return f"{source}: {where}: {msg}"
