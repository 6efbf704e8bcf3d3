"""Cross-field checks: the rules that span several keys or need more than a type.

They run after validation, on the *layered* values (defaults < upstream < route, as
:mod:`gateway_guard.policy` merges them), so a conflict is found however it arises; each
is reported at a key the user set at that level, so an inherited value is blamed once,
where it was written.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from pathlib import Path
from urllib.parse import urlsplit

from ._languages import check_languages
from ._schema import CallSettings, RouteSettings, Settings, SettingsModel, ShedSettings
from ._settings_errors import show
from .errors import SettingsProblem
from .policy import merge_call, merge_route
from .routing import RouteTemplateError, parse_template

__all__ = ["check_route_calls", "check_settings"]


# RFC 8941 sf-token: the Proxy-Status member must be one, or every response's header
# would need quoting rules operators do not expect.
# Used with fullmatch: ``$`` also matches before a trailing newline, which would split
# our log lines.
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]*")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_COLOUR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
# C1 controls and U+2028/U+2029 end a line for some readers too: a URL holding one could
# forge a line in the plain-text page or a log.
_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f\u2028\u2029\"'<>\\`]")
_LINE_BREAK = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _url_problem(value: str, *, allow_path: bool) -> str | None:
    """Why ``value`` is not a safe link target, or None. Only http(s) (or a /path)."""
    if _CONTROL.search(value):
        return (
            "must not contain spaces, quotes, angle brackets or control characters, "
            f"got {show(value)}"
        )
    if allow_path and value.startswith("/") and not value.startswith("//"):
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
        allowed = "an http(s) URL or a /path" if allow_path else "an http(s) URL"
        return f"must be {allowed}, got {show(value)}"
    try:
        # httpx does not range-check ports: sync clients silently wrap 99999 around.
        port = urlsplit(value).port
    except ValueError:
        return f"has an invalid port (1-65535), got {show(value)}"
    if port == 0:
        return f"has an invalid port (1-65535), got {show(value)}"
    if not allow_path and not urlsplit(value).hostname:
        return f"must name a host, got {show(value)}"
    return None


def _shadowed_by(routes: list[RouteSettings], i: int) -> int | None:
    """The earlier route with the same template that takes every request route ``i``
    would match (same path, and its methods include all of ``i``'s), or None."""
    route = routes[i]
    methods = None if route.methods is None else {m.upper() for m in route.methods}
    for j in range(i):
        other = routes[j]
        if other.path != route.path:
            continue
        if other.methods is None or (
            methods is not None and methods <= {m.upper() for m in other.methods}
        ):
            return j
    return None


def check_settings(settings: Settings) -> list[SettingsProblem]:
    """Checks that span several keys or need more than a type (run after validation)."""
    problems: list[SettingsProblem] = []

    def add(path: str, message: str) -> None:
        problems.append(SettingsProblem(path, message))

    if not _TOKEN.fullmatch(settings.service):
        add(
            "service",
            f"must be a structured-field token (letters, digits, -._:/ ...; "
            f"starting with a letter or *), got {show(settings.service)}",
        )
    brand = settings.brand
    if not _COLOUR.fullmatch(brand.accent_color):
        add(
            "brand.accent_color",
            f"must be a hex colour like #5b21b6, got {show(brand.accent_color)}",
        )
    for key in ("logo_url", "support_url", "status_url"):
        url = getattr(brand, key)
        if url is not None and (why := _url_problem(url, allow_path=True)):
            add(f"brand.{key}", why)
    if _LINE_BREAK.search(brand.name):
        add("brand.name", f"must be one line without control characters, got {show(brand.name)}")
    if brand.template_dir is not None and not Path(brand.template_dir).is_dir():
        add("brand.template_dir", f"is not a directory: {show(brand.template_dir)}")
    if why := _url_problem(brand.home_url, allow_path=True):
        add("brand.home_url", why)
    if brand.problem_base_url is not None and (
        why := _url_problem(brand.problem_base_url, allow_path=False)
    ):
        add("brand.problem_base_url", why)
    for path, message in check_languages(brand):
        add(path, message)

    _check_call(settings.defaults, "defaults", problems)
    for name, upstream in settings.upstreams.items():
        where = f"upstreams.{name}"
        if not _UPSTREAM_NAME.fullmatch(name):
            add(where, "upstream names are 1-64 letters, digits, '_', '.', '-'")
        if upstream.base_url is not None and (
            why := _url_problem(upstream.base_url, allow_path=False)
        ):
            add(f"{where}.base_url", why)
        _check_call(merge_call(settings.defaults, upstream), where, problems, owner=upstream)

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
        if route.name is not None and _LINE_BREAK.search(route.name):
            add(
                f"{where}.name",
                f"must be one line without control characters, got {show(route.name)}",
            )
        if (earlier := _shadowed_by(settings.routes, i)) is not None:
            add(
                f"{where}.path",
                f"duplicates routes.{earlier}.path ({show(route.path)}): the earlier route "
                "always matches first, so this one never applies",
            )
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
        check_route_calls(settings, route, where, problems)
    _check_state(settings, problems)
    # Several routes x upstreams can report the same problem; say each once.
    return list(dict.fromkeys(problems))


def check_route_calls(
    settings: Settings, route: RouteSettings, where: str, problems: list[SettingsProblem]
) -> None:
    """The rules of ``route`` layered over each upstream (or the defaults, if none)."""
    bases: dict[str, CallSettings] = {
        name: merge_call(settings.defaults, up) for name, up in settings.upstreams.items()
    } or {"": settings.defaults}
    for name, base in bases.items():
        merged = merge_route(base, route)
        suffix = f" (for upstream {name!r})" if name else ""
        _check_call(merged, where, problems, suffix=suffix, owner=route)


def _redis_url_problem(value: str) -> str | None:
    """Why ``value`` is not a Redis URL redis-py accepts, or None (checked without redis-py,
    so a bad URL is named at startup even where the extra is not installed). The error
    shows the URL without its password: startup errors end up in logs."""
    shown = show(_without_password(value))
    if _LINE_BREAK.search(value) or " " in value:
        return f"must not contain spaces or control characters, got {shown}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return f"has an invalid port (1-65535), got {shown}"
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return None if parts.path else f"must name a socket path, got {shown}"
    if scheme not in ("redis", "rediss"):
        return f"must be a redis://, rediss:// or unix:// URL, got {shown}"
    if not parts.hostname:
        return f"must name a host, got {shown}"
    if port == 0:
        return f"has an invalid port (1-65535), got {shown}"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"database must be a number (redis://host:6379/0), got {shown}"
    return None


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://***@{host}"


def _check_state(settings: Settings, problems: list[SettingsProblem]) -> None:
    state = settings.state
    if why := _redis_url_problem(state.redis_url):
        problems.append(SettingsProblem("state.redis_url", why))
    if state.key_prefix is not None and (not state.key_prefix or _CONTROL.search(state.key_prefix)):
        problems.append(
            SettingsProblem(
                "state.key_prefix",
                f"must be non-empty, without spaces or control characters, got "
                f"{show(state.key_prefix)}",
            )
        )
    if state.backend == "redis" and importlib.util.find_spec("redis") is None:
        problems.append(
            SettingsProblem(
                "state.backend",
                "\"redis\" needs redis-py: pip install 'gateway-guard[redis]'",
            )
        )


def _check_shed(shed: ShedSettings, where: str, problems: list[SettingsProblem]) -> None:
    if shed.max_concurrent == 0 and shed.max_queue > 0 and "max_queue" in shed.model_fields_set:
        problems.append(SettingsProblem(f"{where}.max_queue", "needs max_concurrent > 0"))


def _set_keys(owner: SettingsModel | None, dotted: str) -> bool:
    """Whether ``owner`` (None: the defaults, which own everything) set ``dotted`` itself."""
    if owner is None:
        return True
    section, _, key = dotted.partition(".")
    if not key:
        return section in owner.model_fields_set
    sub = getattr(owner, section, None) if section in owner.model_fields_set else None
    return isinstance(sub, SettingsModel) and key in sub.model_fields_set


def _blame(owner: SettingsModel | None, first: str, second: str) -> str | None:
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
    owner: SettingsModel | None = None,
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
