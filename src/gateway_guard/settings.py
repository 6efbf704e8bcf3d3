"""The settings schema, its front doors (mapping, TOML, JSON, environment) and its errors.

One schema, validated once at startup. Every problem is reported with its dotted key path,
the bad value and what is allowed, and all problems are reported together, so a deploy
fails once with the whole list instead of once per typo. Pydantic is used here only; the
hot path reads the frozen policies that :mod:`gateway_guard.policy` compiles from this.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SettingsError, SettingsProblem
from .routing import RouteTemplateError, parse_template

__all__ = [
    "ENV_PREFIX",
    "ENV_SETTINGS_FILE",
    "BrandSettings",
    "BreakerSettings",
    "BulkheadSettings",
    "CallSettings",
    "RetrySettings",
    "RouteSettings",
    "Settings",
    "ShedSettings",
    "UpstreamSettings",
    "load_settings",
]

ENV_SETTINGS_FILE = "GATEWAY_GUARD_SETTINGS"
ENV_PREFIX = "GATEWAY_GUARD__"

SettingsSource: TypeAlias = "Mapping[str, Any] | str | os.PathLike[str] | Settings | None"

_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)

PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
HttpStatus = Annotated[int, Field(ge=100, le=599)]
HttpMethod = Annotated[str, Field(pattern=r"^[A-Za-z]+$", max_length=32)]
Priority = Literal["critical", "normal", "sheddable"]


class _Model(BaseModel):
    model_config = _MODEL_CONFIG


class RetrySettings(_Model):
    """``[defaults.retry]``, ``[upstreams.NAME.retry]``, ``routes[].retry``."""

    attempts: int = Field(3, ge=1, le=10, description="Attempts in all, including the first.")
    backoff_initial: NonNegativeSeconds = Field(0.1, description="First backoff, seconds.")
    backoff_max: NonNegativeSeconds = Field(2.0, description="Longest backoff, seconds.")
    jitter: bool = Field(True, description="Randomise backoff so callers do not retry in step.")
    on_status: list[HttpStatus] = Field(
        [502, 503, 504], description="Upstream statuses that are retried."
    )
    methods: list[HttpMethod] = Field(
        ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"],
        description="Methods retried after the request may have reached the upstream. "
        "POST/PATCH are retried only with an Idempotency-Key header.",
    )
    retry_non_idempotent: bool = Field(
        False, description="Retry POST/PATCH even without an Idempotency-Key (dangerous)."
    )
    budget_ratio: Rate = Field(
        0.2, description="Retries may add at most this fraction of calls (sliding 10 s window)."
    )
    budget_min_per_second: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="Floor: adds this many retries per second of the 10 s window (a burst).",
    )
    respect_retry_after: bool = Field(True, description="Never retry before Retry-After.")
    max_retry_after: NonNegativeSeconds = Field(
        30.0, description="A longer upstream Retry-After fails fast instead of waiting."
    )


class BreakerSettings(_Model):
    """``[defaults.breaker]``, ``[upstreams.NAME.breaker]``."""

    enabled: bool = Field(True, description="false: the breaker never opens.")
    failure_rate: Rate = Field(0.5, description="Open at this failure rate (0-1).")
    window: Literal["count", "time"] = Field(
        "count", description='"count": the last window_size calls; "time": the last seconds.'
    )
    window_size: int = Field(20, ge=1, le=10_000, description="Calls, or seconds.")
    min_calls: int = Field(10, ge=1, description="Calls in the window before it may open.")
    open_seconds: PositiveSeconds = Field(30.0, description="Time open before probing.")
    max_open_seconds: PositiveSeconds | None = Field(
        None,
        description=(
            "Cap of the growing open time after failed probes; unset: 60 s, or "
            "open_seconds when that is longer."
        ),
    )
    half_open_calls: int = Field(
        3, ge=1, le=1000, description="Probes admitted in half-open; this many successes close it."
    )
    slow_call_seconds: PositiveSeconds = Field(5.0, description="A call this long is slow.")
    slow_call_rate: Rate = Field(1.0, description="Open at this slow-call rate (1 = never).")
    failure_status: list[HttpStatus] = Field(
        [500, 502, 503, 504], description="Statuses counted as failures."
    )


class BulkheadSettings(_Model):
    """``[defaults.bulkhead]``, ``[upstreams.NAME.bulkhead]``: outbound concurrency."""

    max_concurrent: int = Field(100, ge=0, description="Calls in flight (0 = unlimited).")
    max_wait: NonNegativeSeconds = Field(0.0, description="Wait for a free slot (0 = fail fast).")


class ShedSettings(_Model):
    """``[shed]`` and ``routes[].shed``: inbound load shedding."""

    max_concurrent: int = Field(200, ge=0, description="Requests in flight (0 = no limit).")
    max_queue: int = Field(400, ge=0, description="Requests waiting for a slot.")
    queue_timeout: NonNegativeSeconds = Field(1.0, description="Longest wait in the queue.")
    exempt: list[str] = Field(
        ["/healthz", "/metrics"], description="Paths (or templates) never shed (app-wide only)."
    )


class CallSettings(_Model):
    """``[defaults]``: applies to every upstream call."""

    connect_timeout: PositiveSeconds = Field(2.0, description="Seconds to connect.")
    read_timeout: PositiveSeconds = Field(10.0, description="Seconds between bytes read.")
    deadline: PositiveSeconds = Field(15.0, description="One call, all retries included.")
    raise_on_failure_status: bool = Field(
        True, description="Retries spent and still a failure status: raise UpstreamStatusError."
    )
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    bulkhead: BulkheadSettings = BulkheadSettings()


class UpstreamSettings(CallSettings):
    """``[upstreams.NAME]``: one upstream; any ``defaults`` key may be overridden."""

    base_url: str | None = Field(None, description="http(s) URL the clients are based on.")


class RouteSettings(_Model):
    """``[[routes]]``: a route policy; the first matching entry wins."""

    path: str = Field(description="Route template: /orders/{id}, /static/{rest:path}.")
    methods: list[HttpMethod] | None = Field(
        None, min_length=1, description="Methods matched (all if unset)."
    )
    name: str | None = Field(None, max_length=100, description="Name in logs (default: path).")
    priority: Priority = Field("normal", description="Shedding order: sheddable goes first.")
    depends_on: list[str] = Field(
        [], description="Upstreams whose open breaker makes this route answer 503 at once."
    )
    connect_timeout: PositiveSeconds | None = None
    read_timeout: PositiveSeconds | None = None
    deadline: PositiveSeconds | None = Field(None, description="Inbound request deadline.")
    raise_on_failure_status: bool | None = None
    retry: RetrySettings | None = None
    shed: ShedSettings | None = None


class BrandSettings(_Model):
    """``[brand]``: how the error pages look."""

    name: str = Field("", max_length=200, description="Shown in the page title and heading.")
    logo_url: str | None = Field(None, description="http(s) URL or /path of a logo image.")
    accent_color: str = Field("#2563eb", description="Hex colour: #rgb or #rrggbb.")
    support_url: str | None = Field(None, description="Where visitors can get help.")
    status_url: str | None = Field(None, description="The public status page.")
    template_dir: str | None = Field(None, description="Directory of Jinja2 overrides.")
    lang: str = Field("en", pattern=r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")


class Settings(_Model):
    """The whole gateway_guard configuration (DESIGN §2)."""

    service: str = Field("gateway-guard", description="Deployment name; the Proxy-Status member.")
    debug: bool = Field(False, description="Rich diagnostics in pages and headers. Never in prod.")
    brand_app_errors: bool = Field(
        False, description="Also brand 502/503/504 responses that the app returns itself."
    )
    brand: BrandSettings = BrandSettings()
    defaults: CallSettings = CallSettings()
    upstreams: dict[str, UpstreamSettings] = {}
    shed: ShedSettings = ShedSettings()
    routes: list[RouteSettings] = []


# --- loading ---------------------------------------------------------------------------


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
        raw: dict[str, Any] = _read_file(file, ENV_SETTINGS_FILE) if file else {}
    elif isinstance(source, str | os.PathLike):
        raw = _read_file(os.fspath(source), "settings file")
    elif isinstance(source, Mapping):
        raw = _plain(source)
    else:
        raise SettingsError(
            f"settings must be a mapping, a .toml/.json path or a Settings, "
            f"got {type(source).__name__}"
        )
    problems: list[SettingsProblem] = []
    _apply_env(raw, env, problems)
    settings = _validate(raw, problems)
    if settings is not None:
        problems.extend(check_settings(settings))
    if problems:
        raise SettingsError(problems)
    assert settings is not None  # no problems means validation succeeded
    return settings


def _plain(value: Any) -> Any:
    """Deep-copy mappings and sequences into dicts and lists (Django/TOML hand us others)."""
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _read_file(path: str, what: str) -> dict[str, Any]:
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
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{what} {path!r}: is not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(parsed, dict):
        raise SettingsError(f"{what} {path!r}: must hold a table/object at the top level")
    # Editors point JSON files at their schema with "$schema"; it is not a setting.
    parsed.pop("$schema", None)
    result: dict[str, Any] = _plain(parsed)
    return result


# --- environment overrides --------------------------------------------------------------


def _apply_env(
    raw: dict[str, Any], env: Mapping[str, str], problems: list[SettingsProblem]
) -> None:
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
        model = _child_model(model, part)
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


def _child_model(model: Any, key: str) -> Any:
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


# --- validation and error messages -------------------------------------------------------


def _validate(raw: dict[str, Any], problems: list[SettingsProblem]) -> Settings | None:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_translate(err) for err in exc.errors(include_url=False))
        return None


def _fields_at(loc: Sequence[str | int]) -> list[str]:
    model: Any = Settings
    for part in loc:
        if isinstance(model, tuple):
            model = model[1]
            continue
        model = _child_model(model, str(part))
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _show(value: Any) -> str:
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


def _translate(err: Mapping[str, Any]) -> SettingsProblem:
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
        return SettingsProblem(path, f"must be {_TYPE_NAMES[kind]}, got {_show(value)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {
            "greater_than": "greater than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }
        bound = next(iter(ctx.values()), "?")
        return SettingsProblem(path, f"must be {words[kind]} {bound}, got {_show(value)}")
    if kind == "finite_number":
        return SettingsProblem(path, f"must be a finite number, got {_show(value)}")
    if kind == "literal_error":
        return SettingsProblem(path, f"must be one of {ctx.get('expected')}, got {_show(value)}")
    if kind == "string_pattern_mismatch":
        return SettingsProblem(path, f"must match {ctx.get('pattern')!s}, got {_show(value)}")
    if kind in ("string_too_long", "too_long"):
        return SettingsProblem(path, f"is too long (at most {ctx.get('max_length')})")
    return SettingsProblem(path, f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {_show(value)}")


# --- cross-field checks --------------------------------------------------------------------

# RFC 8941 sf-token: the Proxy-Status member must be one, or every response's header
# would need quoting rules operators do not expect.
_TOKEN = re.compile(r"^[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]*$")
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_COLOUR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_CONTROL = re.compile(r"[\x00-\x20\x7f\"'<>\\`]")


def _url_problem(value: str, *, allow_path: bool) -> str | None:
    """Why ``value`` is not a safe link target, or None. Only http(s) (or a /path)."""
    if _CONTROL.search(value):
        return (
            "must not contain spaces, quotes, angle brackets or control characters, "
            f"got {_show(value)}"
        )
    if allow_path and value.startswith("/") and not value.startswith("//"):
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
        allowed = "an http(s) URL or a /path" if allow_path else "an http(s) URL"
        return f"must be {allowed}, got {_show(value)}"
    try:
        # httpx does not range-check ports: sync clients silently wrap 99999 around.
        port = urlsplit(value).port
    except ValueError:
        return f"has an invalid port (1-65535), got {_show(value)}"
    if port == 0:
        return f"has an invalid port (1-65535), got {_show(value)}"
    return None


def check_settings(settings: Settings) -> list[SettingsProblem]:
    """Checks that span several keys or need more than a type (run after validation)."""
    problems: list[SettingsProblem] = []

    def add(path: str, message: str) -> None:
        problems.append(SettingsProblem(path, message))

    if not _TOKEN.match(settings.service):
        add(
            "service",
            f"must be a structured-field token (letters, digits, -._:/ ...; "
            f"starting with a letter or *), got {_show(settings.service)}",
        )
    brand = settings.brand
    if not _COLOUR.match(brand.accent_color):
        add(
            "brand.accent_color",
            f"must be a hex colour like #5b21b6, got {_show(brand.accent_color)}",
        )
    for key in ("logo_url", "support_url", "status_url"):
        url = getattr(brand, key)
        if url is not None and (why := _url_problem(url, allow_path=True)):
            add(f"brand.{key}", why)
    if brand.template_dir is not None and not Path(brand.template_dir).is_dir():
        add("brand.template_dir", f"is not a directory: {_show(brand.template_dir)}")

    _check_call(settings.defaults, "defaults", problems)
    for name, upstream in settings.upstreams.items():
        where = f"upstreams.{name}"
        if not _UPSTREAM_NAME.match(name):
            add(where, "upstream names are 1-64 letters, digits, '_', '.', '-'")
        if upstream.base_url is not None and (
            why := _url_problem(upstream.base_url, allow_path=False)
        ):
            add(f"{where}.base_url", why)
        _check_call(_merge_call(settings.defaults, upstream), where, problems, owner=upstream)

    _check_shed(settings.shed, "shed", problems)
    for i, pattern in enumerate(settings.shed.exempt):
        try:
            parse_template(pattern)
        except RouteTemplateError as exc:
            add(f"shed.exempt.{i}", str(exc))

    for i, route in enumerate(settings.routes):
        where = f"routes.{i}"
        try:
            parse_template(route.path)
        except RouteTemplateError as exc:
            add(f"{where}.path", str(exc))
        for j, dep in enumerate(route.depends_on):
            if dep not in settings.upstreams:
                hint = difflib.get_close_matches(dep, list(settings.upstreams), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                known = ", ".join(sorted(settings.upstreams)) or "none configured"
                add(
                    f"{where}.depends_on.{j}",
                    f"unknown upstream {dep!r}{extra} (upstreams: {known})",
                )
        if route.shed is not None:
            if "exempt" in route.shed.model_fields_set:
                add(f"{where}.shed.exempt", "exempt paths are app-wide: set them in [shed]")
            _check_shed(route.shed, f"{where}.shed", problems)
        bases: dict[str, CallSettings] = {
            name: _merge_call(settings.defaults, up) for name, up in settings.upstreams.items()
        } or {"": settings.defaults}
        for name, base in bases.items():
            merged = _merge_route(base, route)
            suffix = f" (for upstream {name!r})" if name else ""
            _check_call(merged, where, problems, suffix=suffix, owner=route)
    # Several routes x upstreams can report the same problem; say each once.
    return list(dict.fromkeys(problems))


def validate_view_overrides(
    settings: Settings, where: str, raw: Mapping[str, Any]
) -> RouteSettings:
    """Validate a per-view policy as a route entry; problems are named ``<where>.<key>``."""
    problems: list[SettingsProblem] = []
    try:
        route = RouteSettings.model_validate(_plain(raw))
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            problem = _translate(err)
            problems.append(SettingsProblem(f"{where}.{problem.path}", problem.message))
        raise SettingsError(problems) from None
    for j, dep in enumerate(route.depends_on):
        if dep not in settings.upstreams:
            known = ", ".join(sorted(settings.upstreams)) or "none configured"
            problems.append(
                SettingsProblem(f"{where}.depends_on.{j}", f"unknown upstream {dep!r} ({known})")
            )
    bases = {n: _merge_call(settings.defaults, up) for n, up in settings.upstreams.items()}
    for name, base in (bases or {"": settings.defaults}).items():
        suffix = f" (for upstream {name!r})" if name else ""
        _check_call(_merge_route(base, route), where, problems, suffix=suffix, owner=route)
    if problems:
        raise SettingsError(list(dict.fromkeys(problems)))
    return route


def _check_shed(shed: ShedSettings, where: str, problems: list[SettingsProblem]) -> None:
    if shed.max_concurrent == 0 and shed.max_queue > 0 and "max_queue" in shed.model_fields_set:
        problems.append(SettingsProblem(f"{where}.max_queue", "needs max_concurrent > 0"))


def _set_keys(owner: _Model | None, dotted: str) -> bool:
    """Whether ``owner`` (None: the defaults, which own everything) set ``dotted`` itself."""
    if owner is None:
        return True
    section, _, key = dotted.partition(".")
    if not key:
        return section in owner.model_fields_set
    sub = getattr(owner, section, None) if section in owner.model_fields_set else None
    return isinstance(sub, _Model) and key in sub.model_fields_set


def _blame(owner: _Model | None, first: str, second: str) -> str | None:
    """Which of two conflicting keys to report: one the user set at this level.

    A conflict made only of inherited values was already reported where they were set.
    """
    if _set_keys(owner, first):
        return first
    if _set_keys(owner, second):
        return second
    return None


def _check_call(
    call: CallSettings,
    where: str,
    problems: list[SettingsProblem],
    *,
    suffix: str = "",
    owner: _Model | None = None,
) -> None:
    """Cross-field rules of one layered call policy, reported at the keys ``owner`` set."""

    def add(key: str | None, message: str) -> None:
        if key is not None:
            problems.append(SettingsProblem(f"{where}.{key}", message + suffix))

    is_route = isinstance(owner, RouteSettings)
    for key in ("connect_timeout", "read_timeout"):
        value = getattr(call, key)
        if value <= call.deadline:
            continue
        # An inherited timeout longer than a route's deadline is fine: attempts are clipped
        # to the time left. Only a timeout the route sets itself is a contradiction.
        blame = (
            (key if _set_keys(owner, key) else None) if is_route else _blame(owner, key, "deadline")
        )
        add(blame, f"{key} {value:g} s must not exceed the deadline {call.deadline:g} s")
    retry = call.retry
    if retry.backoff_initial > retry.backoff_max:
        add(
            _blame(owner, "retry.backoff_initial", "retry.backoff_max"),
            f"backoff_initial {retry.backoff_initial:g} must not exceed backoff_max "
            f"{retry.backoff_max:g}",
        )
    if is_route:
        for key in ("budget_ratio", "budget_min_per_second"):
            if _set_keys(owner, f"retry.{key}"):
                add(
                    f"retry.{key}",
                    "retry budgets are per upstream: set it in [upstreams.NAME.retry]",
                )
        return
    breaker = call.breaker
    if breaker.window == "count" and breaker.min_calls > breaker.window_size:
        add(
            _blame(owner, "breaker.min_calls", "breaker.window_size"),
            f"min_calls {breaker.min_calls} must not exceed window_size {breaker.window_size} "
            "for a count window",
        )
    if breaker.max_open_seconds is not None and breaker.max_open_seconds < breaker.open_seconds:
        add(
            _blame(owner, "breaker.max_open_seconds", "breaker.open_seconds"),
            f"max_open_seconds {breaker.max_open_seconds:g} must be at least open_seconds "
            f"{breaker.open_seconds:g}",
        )
    if math.isclose(breaker.failure_rate, 0.0) and breaker.enabled:
        add(
            _blame(owner, "breaker.failure_rate", "breaker.enabled"),
            "failure_rate must be greater than 0 (0 would open on the first call)",
        )


def _override(base: _Model, over: _Model | None) -> Any:
    """``base`` with the keys the user set in ``over`` (per key, nested sections merged)."""
    if over is None:
        return base
    updates: dict[str, Any] = {}
    for key in over.model_fields_set:
        if key not in type(base).model_fields:
            continue
        value = getattr(over, key)
        current = getattr(base, key)
        if isinstance(value, _Model) and isinstance(current, _Model):
            value = _override(current, value)
        if value is not None:
            updates[key] = value
    return base.model_copy(update=updates) if updates else base


def _merge_call(defaults: CallSettings, upstream: UpstreamSettings) -> CallSettings:
    merged: CallSettings = _override(defaults, upstream)
    return merged


def _merge_route(base: CallSettings, route: RouteSettings) -> CallSettings:
    merged: CallSettings = _override(base, route)
    # A route's deadline is the whole inbound request's: it caps an upstream's own call
    # deadline but never loosens a tighter one.
    if route.deadline is not None and base.deadline < route.deadline:
        merged = merged.model_copy(update={"deadline": base.deadline})
    return merged


def merge_shed(app: ShedSettings, route: RouteSettings) -> ShedSettings | None:
    """A route's own shed limit (app values for keys it did not set), or None."""
    if route.shed is None:
        return None
    merged: ShedSettings = _override(app, route.shed)
    return merged


def effective_call(settings: Settings, upstream: str, route: RouteSettings | None) -> CallSettings:
    """The layered settings for one call: defaults < upstream < route, merged per key."""
    call = settings.defaults
    if upstream in settings.upstreams:
        call = _merge_call(call, settings.upstreams[upstream])
    if route is not None:
        call = _merge_route(call, route)
    return call
