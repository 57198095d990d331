"""The base of every typed config, and how validation errors are worded.

At the bottom of kdistill: the configs of runs (:mod:`kdistill.config`) and the options of
every method (:mod:`kdistill.methods`) derive from :class:`StrictConfig`; it imports
nothing of kdistill's.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class StrictConfig(BaseModel):
    # allow_inf_nan=False: a learning rate, temperature or weight of .nan or .inf is
    # rejected at load time instead of turning the first step's loss into NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """YAML reads yes/true as booleans, which pydantic would quietly turn into 1: refuse."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and _is_number(field.annotation):
                    raise ValueError(f"{key}: expected a number, got {str(value).lower()}")
        return data


def _is_number(annotation: Any) -> bool:
    args = getattr(annotation, "__args__", None)
    if args:  # Optional[int], int | None
        return any(_is_number(a) for a in args)
    return annotation in (int, float)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def error_lines(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Each error of ``error`` as (the dotted path of its key, ``"path: problem"``)."""
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            # validators report "sub.key: problem" for keys below the one they check
            head, sep, rest = msg.partition(": ")
            if sep and head.replace(".", "").replace("_", "").isalnum():
                loc, msg = (f"{loc}.{head}" if loc else head), rest
        path = ".".join(p for p in (prefix, loc) if p)
        shown = "" if err["type"] in ("extra_forbidden", "value_error", "missing") else f" (got {err.get('input')!r})"
        lines.append((path, f"{path}: {msg}{shown}" if path else f"{msg}{shown}"))
    return lines


def format_errors(error: ValidationError, prefix: str = "") -> str:
    return "; ".join(line for _, line in error_lines(error, prefix))
