"""httpx instrumentation: the seam is ``Client._transport_for_url`` (and AsyncClient's).

Every request an ``httpx.Client`` sends asks that method which transport to use, the
client's own or a mount's. The patch wraps the chosen transport in the upstream's
:class:`~gateway_guard.transport.GuardedTransport` when the URL belongs to an upstream, so:

- every client is covered, including the ones third-party SDKs build for themselves, and
  whatever transport they chose (proxies, mounts, their own);
- a transport that is already guarded (``guard.client()``, ``guard.transport()``) is
  returned as it is: no call is guarded twice;
- OpenTelemetry patches ``HTTPTransport.handle_request`` and Sentry ``Client.send``, other
  attributes, so all three stack in either order;
- a call to any other host costs the original method, one host lookup and a comparison.

Each wrapped transport is made once per (transport, upstream) and kept as long as the
transport lives (weakly keyed), so connection pools are the client's own and are reused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from .transport import AsyncGuardedTransport, GuardedTransport

if TYPE_CHECKING:
    from ._hosts import HostMap
    from .guard import Guard

__all__ = ["PATCHER"]

_ATTR = "_transport_for_url"
_GUARDED = (GuardedTransport, AsyncGuardedTransport)


class _Routes:
    """The instrumented Guard's host map, and the guarded wrappers made so far."""

    __slots__ = ("guard", "hosts", "wrapped")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.hosts: HostMap = guard.hosts
        self.wrapped: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

    def wrap(self, transport: Any, name: str, sync: bool) -> Any:
        try:
            by_name = self.wrapped.get(transport)
        except TypeError:  # not weakly referenceable: wrap per call, keep nothing
            by_name = None
            return self._make(transport, name, sync)
        if by_name is None:
            by_name = self.wrapped.setdefault(transport, {})
        guarded = by_name.get(name)
        if guarded is None:
            # Two threads may both make one: either is fine, both share the upstream's
            # breaker, budget and bulkhead.
            guarded = by_name[name] = self._make(transport, name, sync)
        return guarded

    def _make(self, transport: Any, name: str, sync: bool) -> Any:
        rt = self.guard.runtime(name)
        return GuardedTransport(rt, transport) if sync else AsyncGuardedTransport(rt, transport)


_routes: _Routes | None = None


def _wrapper(original: Callable[[Any, httpx.URL], Any], sync: bool) -> Callable[..., Any]:
    def _transport_for_url(self: Any, url: httpx.URL) -> Any:
        transport = original(self, url)
        routes = _routes
        if routes is None or routes.hosts.empty:
            return transport
        name = routes.hosts.lookup(url.host, url.port, url.scheme, url.path)
        if name is None or isinstance(transport, _GUARDED):
            return transport
        return routes.wrap(transport, name, sync)

    _transport_for_url.__wrapped__ = original  # type: ignore[attr-defined]
    _transport_for_url.__gateway_guard__ = True  # type: ignore[attr-defined]
    return _transport_for_url


class _HttpxPatcher:
    def __init__(self) -> None:
        self._originals: dict[type, Any] = {}
        self._wrappers: dict[type, Any] = {}

    def patch(self, guard: Guard) -> None:
        global _routes
        if _routes is None or _routes.guard is not guard:
            _routes = _Routes(guard)
        for cls, sync in ((httpx.Client, True), (httpx.AsyncClient, False)):
            if cls in self._wrappers:
                continue
            original = cls.__dict__[_ATTR]
            wrapper = _wrapper(original, sync)
            self._originals[cls] = original
            self._wrappers[cls] = wrapper
            setattr(cls, _ATTR, wrapper)

    def unpatch(self) -> None:
        global _routes
        _routes = None  # a wrapper someone else wrapped again now passes everything on
        for cls, original in self._originals.items():
            if cls.__dict__.get(_ATTR) is self._wrappers[cls]:
                setattr(cls, _ATTR, original)
        self._originals.clear()
        self._wrappers.clear()


PATCHER = _HttpxPatcher()
