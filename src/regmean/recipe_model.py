"""The base of every part of a merge recipe (the recipe itself, its models, its methods' options)."""

from __future__ import annotations

from types import UnionType
from typing import Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class RecipeModel(BaseModel):
    """Unknown keys are refused, so are NaN and infinity, and so is a yes/no value where a number goes: YAML reads
    on, off, yes, no, true and false as booleans, which would otherwise pass as 1 and 0 (`alpha: off` as alpha 0)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise ValueError(f"expected a number, not {value} (YAML reads yes/no/on/off/true/false as booleans)")
        return value


def _numeric(annotation: object) -> bool:
    """Whether a field holds a number (int or float, optionally None), not a bool."""
    union = get_origin(annotation) in (Union, UnionType)
    kinds = [a for a in (get_args(annotation) if union else (annotation,)) if a is not type(None)]
    return bool(kinds) and all(kind in (int, float) for kind in kinds)
