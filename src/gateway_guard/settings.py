"""Settings: the front doors (mapping, TOML, JSON, environment) to one validated schema.

One schema, validated once at startup. Every problem is reported with its dotted key path,
the bad value and what is allowed, and all problems are reported together, so a deploy
fails once with the whole list instead of once per typo. Pydantic is used by the settings
modules only; the hot path reads the frozen policies that :mod:`gateway_guard.policy`
compiles from this.

The parts, one concern each: :mod:`._schema` (the models and every default),
:mod:`._settings_load` (files, environment overrides), :mod:`._settings_errors` (pydantic's
errors in our words), :mod:`._settings_checks` (rules across keys). Layering (defaults <
upstream < route) is :mod:`gateway_guard.policy`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeAlias

from pydantic import ValidationError

# `import X as X`: re-exported for code written before this module was split; not API
# (docs/api.md lists what is), so not in __all__.
from ._schema import BrandSettings as BrandSettings
from ._schema import BreakerSettings as BreakerSettings
from ._schema import BulkheadSettings as BulkheadSettings
from ._schema import CallSettings as CallSettings
from ._schema import RetrySettings as RetrySettings
from ._schema import (
    RouteSettings,
    Settings,
)
from ._schema import ShedSettings as ShedSettings
from ._schema import StateSettings as StateSettings
from ._schema import UpstreamSettings as UpstreamSettings
from ._settings_checks import check_route_calls, check_settings
from ._settings_errors import translate, validate
from ._settings_load import ENV_PREFIX as ENV_PREFIX
from ._settings_load import ENV_SETTINGS_FILE, apply_env, plain, read_file
from .errors import SettingsError, SettingsProblem

__all__ = ["Settings", "load_settings"]

SettingsSource: TypeAlias = "Mapping[str, Any] | str | os.PathLike[str] | Settings | None"


def load_settings(
    source: SettingsSource = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load, validate and cross-check settings; raise :class:`SettingsError` on any problem.

    ``source`` is a mapping, a ``.toml`` / ``.json`` path, a :class:`Settings`, or ``None``
    for the file named by ``GATEWAY_GUARD_SETTINGS`` (or built-in defaults). Environment
    overrides ``GATEWAY_GUARD__SECTION__KEY=value`` apply on top of any source except a
    ready :class:`Settings`, so operators can change one value without touching code.
    """
    if isinstance(source, Settings):
        return source
    env = os.environ if environ is None else environ
    if source is None:
        file = env.get(ENV_SETTINGS_FILE)
        raw: dict[str, Any] = read_file(file, ENV_SETTINGS_FILE) if file else {}
    elif isinstance(source, str | os.PathLike):
        raw = read_file(os.fspath(source), "settings file")
    elif isinstance(source, Mapping):
        raw = plain(source)
    else:
        raise SettingsError(
            f"settings must be a mapping, a .toml/.json path or a Settings, "
            f"got {type(source).__name__}"
        )
    problems: list[SettingsProblem] = []
    apply_env(raw, env, problems)
    settings = validate(raw, problems)
    if settings is not None:
        problems.extend(check_settings(settings))
    if problems:
        raise SettingsError(problems)
    assert settings is not None  # no problems means validation succeeded
    return settings


def validate_view_overrides(
    settings: Settings, where: str, raw: Mapping[str, Any]
) -> RouteSettings:
    """Validate a per-view policy as a route entry; problems are named ``<where>.<key>``."""
    problems: list[SettingsProblem] = []
    try:
        route = RouteSettings.model_validate(plain(raw))
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            problem = translate(err)
            problems.append(SettingsProblem(f"{where}.{problem.path}", problem.message))
        raise SettingsError(problems) from None
    for j, dep in enumerate(route.depends_on):
        if dep not in settings.upstreams:
            known = ", ".join(sorted(settings.upstreams)) or "none configured"
            problems.append(
                SettingsProblem(f"{where}.depends_on.{j}", f"unknown upstream {dep!r} ({known})")
            )
    check_route_calls(settings, route, where, problems)
    if problems:
        raise SettingsError(list(dict.fromkeys(problems)))
    return route
