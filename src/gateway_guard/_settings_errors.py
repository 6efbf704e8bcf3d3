"""Settings errors: pydantic's validation errors, said the way DESIGN §2 promises.

Each problem names its full dotted key path, shows the bad value and says what is allowed
(``upstreams.payments.breaker.failure_rate: must be at most 1, got 1.5``); an unknown key
gets a "did you mean" suggestion or the list of keys allowed there.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from ._schema import Settings
from ._settings_load import child_model
from .errors import SettingsProblem

__all__ = ["show", "translate", "validate"]


def validate(raw: dict[str, Any], problems: list[SettingsProblem]) -> Settings | None:
    """``raw`` as :class:`Settings`, or None with every problem added to ``problems``."""
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems.extend(translate(err) for err in exc.errors(include_url=False))
        return None


def _fields_at(loc: Sequence[str | int]) -> list[str]:
    model: Any = Settings
    for part in loc:
        if isinstance(model, tuple):
            model = model[1]
            continue
        model = child_model(model, str(part))
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def show(value: Any) -> str:
    """A bad value as an error message shows it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_TYPE_NAMES = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def translate(err: Mapping[str, Any]) -> SettingsProblem:
    """One of pydantic's error dicts as a :class:`SettingsProblem`."""
    loc = tuple(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    path = ".".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        listing = f" (allowed: {', '.join(allowed)})" if allowed and not hint else ""
        return SettingsProblem(path, f"unknown key{suggestion}{listing}")
    if kind == "missing":
        return SettingsProblem(path, "is required")
    if kind in _TYPE_NAMES:
        return SettingsProblem(path, f"must be {_TYPE_NAMES[kind]}, got {show(value)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {
            "greater_than": "greater than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }
        bound = next(iter(ctx.values()), "?")
        return SettingsProblem(path, f"must be {words[kind]} {bound}, got {show(value)}")
    if kind == "finite_number":
        return SettingsProblem(path, f"must be a finite number, got {show(value)}")
    if kind == "literal_error":
        return SettingsProblem(path, f"must be one of {ctx.get('expected')}, got {show(value)}")
    if kind == "string_pattern_mismatch":
        return SettingsProblem(path, f"must match {ctx.get('pattern')!s}, got {show(value)}")
    if kind in ("string_too_long", "too_long"):
        return SettingsProblem(path, f"is too long (at most {ctx.get('max_length')})")
    return SettingsProblem(path, f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {show(value)}")
