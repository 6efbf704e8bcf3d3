"""aiohttp instrumentation: the seam is ``aiohttp.ClientSession._request``.

Every request of every ``ClientSession`` (SDKs' own included) goes through ``_request``,
which takes per-request client middlewares (aiohttp 3.12+). The patch resolves the URL as
the session would (its ``base_url`` joined) and, when it belongs to an upstream, runs the
request with that upstream's guarded middleware (``guard.aiohttp_middleware``, one per
upstream) in front of the session's own middlewares. A request to any other host goes to
the original ``_request`` untouched.

A session that already has a guarded middleware (``guard.aiohttp_session``, or one the
app added from ``guard.aiohttp_middleware``) is left alone: no call is guarded twice.
OpenTelemetry's aiohttp-client instrumentation adds a trace config to new sessions,
another seam, so the two stack in either order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from aiohttp import ClientSession
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "instrumenting aiohttp needs aiohttp: pip install 'gateway-guard[aiohttp]'"
    ) from exc

from ._aiohttp import GuardedMiddleware
from ._instrument import PerUpstream

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["PATCHER"]


_routes: PerUpstream | None = None
# A middleware of ours (an explicit guard.aiohttp_session()) is never guarded twice.
_guarded_types: tuple[type, ...] = (GuardedMiddleware,)


def _wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    # A plain function returning original's coroutine: no extra coroutine per request.
    def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        routes = _routes
        if routes is None or routes.hosts.empty:
            return original(self, method, str_or_url, **kwargs)
        url = self._build_url(str_or_url)
        name = routes.hosts.lookup(url.host or "", url.explicit_port, url.scheme, url.path)
        if name is None:
            return original(self, method, str_or_url, **kwargs)
        middlewares = kwargs.get("middlewares")
        if middlewares is None:
            middlewares = self._middlewares
        if any(isinstance(m, _guarded_types) for m in middlewares):
            return original(self, method, str_or_url, **kwargs)
        kwargs["middlewares"] = (routes.get(name), *middlewares)
        return original(self, method, str_or_url, **kwargs)

    _request.__wrapped__ = original  # type: ignore[attr-defined]
    return _request


class _AiohttpPatcher:
    def __init__(self) -> None:
        self._original: Any = None
        self._wrapper: Any = None

    def patch(self, guard: Guard) -> None:
        global _routes
        if _routes is None or _routes.guard is not guard:
            _routes = PerUpstream(guard, guard.aiohttp_middleware)
        if self._wrapper is None:
            self._original = ClientSession.__dict__["_request"]
            self._wrapper = _wrapper(self._original)
            ClientSession._request = self._wrapper  # type: ignore[method-assign]

    def unpatch(self) -> None:
        global _routes
        _routes = None
        if self._wrapper is not None and ClientSession.__dict__.get("_request") is self._wrapper:
            ClientSession._request = self._original  # type: ignore[method-assign]
        self._original = self._wrapper = None


PATCHER = _AiohttpPatcher()
