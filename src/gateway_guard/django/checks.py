"""System checks, run by ``manage.py check`` (and before runserver, migrate, tests).

=====================  =======  ==========================================================
id                     level    what
=====================  =======  ==========================================================
gateway_guard.E001     error    GATEWAY_GUARD is invalid: one message per problem, naming
                                its key path (``upstreams.payments.breaker.failure_rate``)
gateway_guard.E002     error    GATEWAY_GUARD is neither a mapping nor a settings file path
gateway_guard.E003     error    a ``@gateway_policy`` has invalid overrides
gateway_guard.E004     error    MIDDLEWARE lists the ASGI/WSGI wrapper
                                (``gateway_guard.GatewayGuardMiddleware``) instead of
                                ``gateway_guard.django.GatewayGuardMiddleware``
gateway_guard.W001     warning  GatewayGuardMiddleware is not in MIDDLEWARE
gateway_guard.W002     warning  GatewayGuardMiddleware comes after middleware that belongs
                                below it
gateway_guard.W003     warning  ``debug`` is on while Django's DEBUG is off
gateway_guard.W004     warning  the brand template cannot be used (the built-in page is)
gateway_guard.W011     warning  a ``[[routes]]`` entry matches none of the URLconf's patterns
gateway_guard.W012     warning  a ``[[routes]]`` path is read in Werkzeug's syntax, which a
                                Django project would write differently
=====================  =======  ==========================================================

All are tagged ``gateway_guard`` (``manage.py check --tag gateway_guard``). Registered in
:meth:`GatewayGuardConfig.ready`, so they run only with the app in INSTALLED_APPS.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.checks import CheckMessage
from django.urls import Resolver404, URLResolver, get_resolver
from django.urls.resolvers import RoutePattern
from django.utils.module_loading import import_string

from gateway_guard._settings_load import ENV_PREFIX
from gateway_guard.asgi import GatewayGuardMiddleware as ASGIMiddleware
from gateway_guard.errors import SettingsError
from gateway_guard.guard import Guard
from gateway_guard.routing import template_syntax, unmatched_routes
from gateway_guard.settings import Settings
from gateway_guard.wsgi import GatewayGuardWSGI

from .conf import SETTING, conf, get_guard
from .decorators import registered_policies
from .middleware import GatewayGuardMiddleware

__all__: list[str] = []

TAG = "gateway_guard"
# The name each @gateway_policy is compiled under by the check (problems name it).
_CHECKED_VIEW = "view"
MIDDLEWARE_PATH = "gateway_guard.django.GatewayGuardMiddleware"
SETTINGS_DOC = "docs/settings.md"
DJANGO_DOC = "docs/django.md"

# Django's own middleware that belongs below GatewayGuardMiddleware. Above it, their
# responses (redirects, 403s, cache hits) get no X-Request-ID and their work is not shed;
# UpdateCacheMiddleware above it would even store one request's id and replay it.
# SecurityMiddleware (and GZip, ConditionalGet) may stay above: nothing they do needs us.
BELONG_BELOW = frozenset(
    {
        "django.contrib.admindocs.middleware.XViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
        "django.contrib.auth.middleware.RemoteUserMiddleware",
        "django.contrib.flatpages.middleware.FlatpageFallbackMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.contrib.redirects.middleware.RedirectFallbackMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.sites.middleware.CurrentSiteMiddleware",
        "django.middleware.cache.CacheMiddleware",
        "django.middleware.cache.FetchFromCacheMiddleware",
        "django.middleware.cache.UpdateCacheMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.middleware.locale.LocaleMiddleware",
    }
)

# Same name, other protocol: gateway_guard.GatewayGuardMiddleware is the ASGI one.
_NOT_DJANGO: tuple[object, ...] = (ASGIMiddleware, GatewayGuardWSGI)


def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E001, E002, W003, W004: the settings, and what the Guard built from them says."""
    value = conf.GATEWAY_GUARD
    if not isinstance(value, Mapping | str | os.PathLike | Settings | None):
        return [
            checks.Error(
                f"{SETTING} must be a mapping or the path of a .toml or .json file, "
                f"got {type(value).__name__}: {_short_repr(value)}.",
                hint=f"See {SETTINGS_DOC}#where-settings-come-from.",
                id="gateway_guard.E002",
            )
        ]
    try:
        guard = get_guard()
    except SettingsError as exc:
        source = _source(value)
        return [
            checks.Error(
                _sentence(f"{SETTING}{source}: {problem}"),
                hint=f"See {SETTINGS_DOC}{_anchor(problem.path)} for what is allowed.",
                id="gateway_guard.E001",
            )
            for problem in exc.problems
        ]
    return _guard_warnings(guard)


def _guard_warnings(guard: Guard) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    if guard.settings.debug and not conf.DEBUG:
        messages.append(
            checks.Warning(
                f"{SETTING}['debug'] is True while DEBUG is False: error pages and headers "
                "show upstream names, hosts and exception details to every visitor.",
                hint="Turn gateway_guard's debug off in production "
                "(it may come from GATEWAY_GUARD__DEBUG in the environment).",
                id="gateway_guard.W003",
            )
        )
    messages.extend(
        checks.Warning(
            _sentence(f"{SETTING}: {problem}"),
            hint=f"See docs/error-pages.md#your-own-template and {SETTINGS_DOC}#brand.",
            id="gateway_guard.W004",
        )
        for problem in guard.renderer.template_problems
    )
    return messages


def check_middleware(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E004, W001, W002: the right GatewayGuardMiddleware is installed, near the top."""
    middleware = conf.MIDDLEWARE
    classes = [_resolve(path) for path in middleware]
    wrong = [path for path, cls in zip(middleware, classes, strict=True) if cls in _NOT_DJANGO]
    if wrong:
        return [
            checks.Error(
                f"MIDDLEWARE lists {path!r}, gateway_guard's ASGI/WSGI wrapper, which is not "
                "a Django middleware.",
                hint=f"Use {MIDDLEWARE_PATH!r} (see {DJANGO_DOC}#quickstart).",
                id="gateway_guard.E004",
            )
            for path in wrong
        ]
    position = next(
        (
            i
            for i, (path, cls) in enumerate(zip(middleware, classes, strict=True))
            if path == MIDDLEWARE_PATH
            or (isinstance(cls, type) and issubclass(cls, GatewayGuardMiddleware))
        ),
        None,
    )
    if position is None:
        return [
            checks.Warning(
                f"{MIDDLEWARE_PATH!r} is not in MIDDLEWARE: requests get no request id, "
                "no load shedding, and gateway errors become plain 500s.",
                hint=f"Add it near the top of MIDDLEWARE, after SecurityMiddleware "
                f"(see {DJANGO_DOC}#where-it-goes-in-middleware).",
                id="gateway_guard.W001",
            )
        ]
    above = [path for path in middleware[:position] if path in BELONG_BELOW]
    if not above:
        return []
    return [
        checks.Warning(
            f"{MIDDLEWARE_PATH!r} comes after {', '.join(map(repr, above))} in MIDDLEWARE: "
            "their responses get no X-Request-ID, their work is not shed, and their "
            "gateway errors are not branded.",
            hint=f"Move it up, just after SecurityMiddleware "
            f"(see {DJANGO_DOC}#where-it-goes-in-middleware).",
            id="gateway_guard.W002",
        )
    ]


def check_view_policies(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E003: every ``@gateway_policy`` compiles against the settings."""
    try:
        guard = get_guard()
    except SettingsError:
        return []  # E001 / E002 say why; nothing can compile against broken settings
    _import_views()
    errors: list[CheckMessage] = []
    for spec in registered_policies():
        try:
            guard.view_policy(_CHECKED_VIEW, **spec.overrides)
        except SettingsError as exc:
            errors.extend(
                checks.Error(
                    _sentence(
                        f"@gateway_policy at {spec.where}: "
                        f"{problem.path.removeprefix(f'view {_CHECKED_VIEW}.')}: "
                        f"{problem.message}"
                    ),
                    hint=f"Keys and values are those of a [[routes]] entry: see "
                    f"{SETTINGS_DOC}#what-a-route-may-set and {DJANGO_DOC}#per-view-policies.",
                    id="gateway_guard.E003",
                )
                for problem in exc.problems
            )
    return errors


def check_routes(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W011, W012: each ``[[routes]]`` path matches some URL pattern, read as Django reads it."""
    try:
        guard = get_guard()
    except SettingsError:
        return []  # E001 / E002 say why
    routes = guard.policies.routes.routes
    if not routes or not getattr(settings, "ROOT_URLCONF", None):
        return []
    try:
        resolver = get_resolver()
        templates = list(_url_templates(resolver.url_patterns, ""))
    except Exception:  # a broken URLconf is reported by Django's own checks
        return []

    def matches(path: str) -> bool:
        try:
            resolver.resolve(path)
        except Resolver404:
            return False
        except Exception:
            return True  # not ours to judge: stay quiet rather than warn wrongly
        return True

    messages: list[CheckMessage] = []
    for route in routes:
        if template_syntax(route.pattern) == "werkzeug":
            messages.append(
                checks.Warning(
                    f"{SETTING}: routes.{route.index}.path: {route.pattern!r} is read in "
                    "Werkzeug's (Flask's) syntax, whose int, uuid and path converters differ "
                    "from Django's on edge cases.",
                    hint=f"Write it as in urls.py, without the leading slash: "
                    f"{route.pattern.lstrip('/')!r} (see {SETTINGS_DOC}#route-templates).",
                    id="gateway_guard.W012",
                )
            )
    messages.extend(
        checks.Warning(
            f"{SETTING}: routes.{route.index}.path: {route.pattern!r} matches none of the "
            "URL patterns, so its deadline, shedding and depends_on never apply.",
            hint=f"Write the path of a URL pattern, as in urls.py: 'orders/<int:id>/' "
            f"(see {SETTINGS_DOC}#route-templates).",
            id="gateway_guard.W011",
        )
        for route in unmatched_routes(routes, matches, templates)
    )
    return messages


def _url_templates(patterns: Sequence[Any], prefix: str) -> Iterator[str]:
    # Only path() patterns read as templates; re_path() ones are still found by resolve().
    for entry in patterns:
        pattern = entry.pattern
        if not isinstance(pattern, RoutePattern):
            continue
        route = prefix + str(pattern)
        if isinstance(entry, URLResolver):
            yield from _url_templates(entry.url_patterns, route)
        else:
            yield "/" + route


CHECKS = (check_settings, check_middleware, check_view_policies, check_routes)


def _resolve(path: str) -> object:
    try:
        return import_string(path)
    except ImportError:
        return None  # Django reports a broken MIDDLEWARE entry itself


def _import_views() -> None:
    # Decorated views register themselves when their module is imported, which is usually
    # when the URLconf is. Django's own URL checks import it too, in no set order.
    if getattr(settings, "ROOT_URLCONF", None):
        with contextlib.suppress(Exception):  # a broken URLconf is reported by Django's checks
            _ = get_resolver().url_patterns


def _source(value: object) -> str:
    if value is None:
        where = "from the environment"
    elif isinstance(value, str | os.PathLike):
        where = repr(os.fspath(value))
    else:
        where = ""
    if any(var.startswith(ENV_PREFIX) for var in os.environ):
        where = (
            f"{where}, with {ENV_PREFIX}* overrides" if where else f"with {ENV_PREFIX}* overrides"
        )
    return f" ({where})" if where else ""


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _anchor(path: str) -> str:
    """The section of docs/settings.md documenting the key at dotted ``path``."""
    parts = path.split(".")
    head = parts[0]
    if head in ("defaults", "upstreams"):
        at = 1 if head == "defaults" else 2  # upstreams.NAME.retry...
        table = parts[at] if len(parts) > at else None
        if table in ("retry", "breaker", "bulkhead"):
            return f"#defaults{table}"
        return "#defaults" if head == "defaults" else "#upstreamsname"
    if head == "routes":
        table = parts[2] if len(parts) > 2 else None  # routes.N.retry...
        return f"#route-{table}" if table in ("retry", "shed") else "#routes"
    if head in ("brand", "shed"):
        return f"#{head}"
    if head in Settings.model_fields:
        return "#top-level-keys"
    return "#where-settings-come-from"
