"""Loading settings: files (TOML, JSON), environment overrides, and the schema's shape.

Environment overrides (``GATEWAY_GUARD__SECTION__KEY=value``) are strings; each is turned
into its field's type by looking at the schema's annotations, and written into the raw
mapping before validation, so it is validated (and reported) like any other value.
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel

from ._schema import Settings
from .errors import SettingsError, SettingsProblem

__all__ = ["ENV_PREFIX", "ENV_SETTINGS_FILE", "apply_env", "child_model", "plain", "read_file"]

ENV_SETTINGS_FILE: Final = "GATEWAY_GUARD_SETTINGS"
ENV_PREFIX: Final = "GATEWAY_GUARD__"


# Deeper than any key path of the schema, far shallower than the interpreter's recursion
# limit: settings nested 100k deep are a SettingsError, not a RecursionError.
MAX_DEPTH: Final = 32


def plain(value: Any, where: str = "", depth: int = 0) -> Any:
    """Deep-copy mappings and sequences into dicts and lists (Django/TOML hand us others)."""
    if depth > MAX_DEPTH and isinstance(value, Mapping | list | tuple):
        raise SettingsError([SettingsProblem(where, f"nested deeper than {MAX_DEPTH} levels")])
    prefix = f"{where}." if where else ""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = k if isinstance(k, str) else str(k)
            out[key] = plain(v, prefix + key, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [plain(v, f"{prefix}{i}", depth + 1) for i, v in enumerate(value)]
    return value


def read_file(path: str, what: str) -> dict[str, Any]:
    """The table in a ``.toml`` / ``.json`` file; ``what`` names it in errors."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SettingsError(f"{what} {path!r}: must end in .toml or .json")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{what} {path!r}: cannot be read ({exc.strerror})") from exc
    try:
        parsed = tomllib.loads(data.decode("utf-8")) if suffix == ".toml" else json.loads(data)
    except (
        tomllib.TOMLDecodeError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        raise SettingsError(f"{what} {path!r}: is not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(parsed, dict):
        raise SettingsError(f"{what} {path!r}: must hold a table/object at the top level")
    # Editors point JSON files at their schema with "$schema"; it is not a setting.
    parsed.pop("$schema", None)
    result: dict[str, Any] = plain(parsed)
    return result


# --- environment overrides --------------------------------------------------------------


def apply_env(raw: dict[str, Any], env: Mapping[str, str], problems: list[SettingsProblem]) -> None:
    """Write each ``GATEWAY_GUARD__A__B=value`` of ``env`` into ``raw``, typed by the schema."""
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            problems.append(SettingsProblem(var, "empty key segment in the variable name"))
            continue
        try:
            _set_path(raw, parts, env[var], var)
        except SettingsError as exc:
            problems.extend(exc.problems)


def _set_path(raw: dict[str, Any], parts: list[str], text: str, var: str) -> None:
    node: Any = raw
    model: Any = Settings
    key: Any
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SettingsError([SettingsProblem(var, f"no routes entry {part!r} to override")])
            key = int(part)
        else:
            # Upstream names keep their case in files; env var names are upper-case.
            key = next((k for k in node if k.lower() == part), part)
        if last:
            node[key] = _coerce_env(text, _annotation_at(model, part))
            return
        model = child_model(model, part)
        if model is None:
            raise SettingsError([SettingsProblem(var, f"{part!r} is not a section")])
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = [] if isinstance(model, tuple) and model[0] == "list" else {}
            node[key] = child
        if not isinstance(child, dict | list):
            raise SettingsError([SettingsProblem(var, f"{part!r} is not a section")])
        node = child


def _annotation_at(model: Any, key: str) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel) and key in model.model_fields:
        return model.model_fields[key].annotation
    return None


def _coerce_env(text: str, annotation: Any) -> Any:
    """Turn an environment string into the field's type: JSON where it parses, else text.

    List fields also take comma-separated values (``502,503``), the usual shell idiom.
    """
    stripped = text.strip()
    wants_list = _is_list(annotation)
    if wants_list and stripped and not stripped.startswith("["):
        return [_coerce_env(item.strip(), _list_item(annotation)) for item in stripped.split(",")]
    if _wants_str(annotation):
        return text
    try:
        return json.loads(stripped)
    except ValueError:
        return text


# --- the schema's shape, read from its annotations ---------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return [annotation]


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in _unwrap(annotation))


def _list_item(annotation: Any) -> Any:
    for a in _unwrap(annotation):
        if typing.get_origin(a) is list:
            return typing.get_args(a)[0]
    return None


def _wants_str(annotation: Any) -> bool:
    options = _unwrap(annotation)
    return bool(options) and all(
        a is str
        or (typing.get_origin(a) is Literal)
        or (_unwrap(a) == [str] and a is not annotation)
        for a in options
    )


def child_model(model: Any, key: str) -> Any:
    """The model class found under ``key`` (through dicts of models and lists of models)."""
    if model is None:
        return None
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(key)
        if field is None:
            return None
        return _container_or_model(field.annotation)
    if isinstance(model, tuple) and model[0] in ("dict", "list"):
        return model[1]
    return None


def _container_or_model(annotation: Any) -> Any:
    for a in _unwrap(annotation):
        origin = typing.get_origin(a)
        if origin is dict:
            return ("dict", _first_model(typing.get_args(a)[1]))
        if origin is list:
            return ("list", _first_model(typing.get_args(a)[0]))
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _first_model(annotation: Any) -> Any:
    for a in _unwrap(annotation):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None
