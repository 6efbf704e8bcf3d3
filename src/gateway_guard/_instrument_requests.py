"""requests instrumentation: the seam is ``requests.adapters.HTTPAdapter.send``.

Every request a ``requests.Session`` sends (``requests.get`` included, and SDKs' own
sessions) ends in its mounted adapter's ``send``. The patch hands a request whose URL
belongs to an upstream to that upstream's guarded adapter (``guard.requests_adapter``,
one per upstream, made on first use): urllib3's own retries are off there and ours decide,
and ``verify``, ``cert`` and ``proxies`` pass through per request. Any other request goes
to the original ``send`` untouched.

The guarded adapter is an ``HTTPAdapter`` itself and reaches the network through
``HTTPAdapter.send``, that is through this patch: it is recognised and passed straight on,
so no call is guarded twice; an adapter the app mounted from ``guard.requests_adapter``
is recognised the same way. OpenTelemetry's requests instrumentation patches
``Session.send``, another attribute, so the two stack in either order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from requests.adapters import HTTPAdapter
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "instrumenting requests needs requests: pip install 'gateway-guard[requests]'"
    ) from exc

from ._instrument import PerUpstream
from ._requests import GuardedAdapter

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["PATCHER"]


_routes: PerUpstream | None = None
# The guarded adapter's class, known once the first one is made: its sends pass through.
# An adapter of ours (an explicit guard.session() or requests_adapter()) is never guarded twice.
_guarded_types: tuple[type, ...] = (GuardedAdapter,)


def _wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        routes = _routes
        if routes is None or isinstance(self, _guarded_types):
            return original(self, request, *args, **kwargs)
        name = routes.hosts.lookup_url(request.url) if not routes.hosts.empty else None
        if name is None:
            return original(self, request, *args, **kwargs)
        return routes.get(name).send(request, *args, **kwargs)

    send.__wrapped__ = original  # type: ignore[attr-defined]
    return send


class _RequestsPatcher:
    def __init__(self) -> None:
        self._original: Any = None
        self._wrapper: Any = None

    def patch(self, guard: Guard) -> None:
        global _routes
        if _routes is None or _routes.guard is not guard:
            _routes = PerUpstream(guard, guard.requests_adapter)
        if self._wrapper is None:
            self._original = HTTPAdapter.__dict__["send"]
            self._wrapper = _wrapper(self._original)
            HTTPAdapter.send = self._wrapper  # type: ignore[method-assign]

    def unpatch(self) -> None:
        global _routes
        routes, _routes = _routes, None
        if self._wrapper is not None and HTTPAdapter.__dict__.get("send") is self._wrapper:
            HTTPAdapter.send = self._original  # type: ignore[method-assign]
        self._original = self._wrapper = None
        if routes is not None:
            for adapter in routes.made.values():
                adapter.close()


PATCHER = _RequestsPatcher()
