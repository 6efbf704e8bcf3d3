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
A client also keeps the last decision taken for it, which the wrapper compares inline: a
client calls one upstream over and over. Both are inert once uninstrumented.
"""

from __future__ import annotations

import contextlib
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
_CACHE = "_gateway_guard_wrapped"
_GUARDED = (GuardedTransport, AsyncGuardedTransport)


# Decisions remembered per transport, by (host, port, scheme): a bound, since wildcard
# patterns admit any number of hosts.
_MAX_DECISIONS = 64


class _Routes:
    """The instrumented Guard's host map, and the decisions taken so far."""

    __slots__ = ("guard", "has_paths", "hosts", "names", "tops", "weak")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.hosts: HostMap = guard.hosts
        self.names = guard.hosts.names
        self.tops = guard.hosts.tops
        self.has_paths = guard.hosts.has_paths
        # For transports without a __dict__ (slots): weakly keyed, so nothing outlives them.
        self.weak: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()

    def decide(self, transport: Any, url: httpx.URL, host: str, sync: bool) -> Any:
        """The transport for a URL whose host may belong to an upstream (the slow path:
        the client's last decision, which the wrapper compares inline, was another)."""
        if self.has_paths:  # base_url paths: the decision depends on the path too
            return self._choose(transport, url, host, sync)
        decisions = self._decisions(transport)
        if decisions is None:
            return self._choose(transport, url, host, sync)
        ref = url._uri_reference
        key = (host, ref[3], ref[0])  # (host, port, scheme)
        chosen = decisions.get(key)
        if chosen is not None:
            return chosen
        chosen = self._choose(transport, url, host, sync)
        for other in decisions.values():
            # The same upstream reached by another host name: one wrapper, one pool.
            if (
                type(other) is type(chosen)
                and getattr(other, "_inner", None) is transport
                and getattr(other, "_rt", None) is getattr(chosen, "_rt", None)
            ):
                chosen = other
                break
        if len(decisions) >= _MAX_DECISIONS:
            decisions.clear()
        # Two threads may both decide: either answer is right, and both wrappers share the
        # upstream's breaker, budget and bulkhead.
        decisions[key] = chosen
        return chosen

    def _decisions(self, transport: Any) -> dict[Any, Any] | None:
        attrs = getattr(transport, "__dict__", None)
        if attrs is not None:
            # Kept on the transport itself, tagged with these routes, so a re-instrumented
            # Guard never gets another Guard's wrapper: [these routes, decisions by key].
            entry = attrs.get(_CACHE)
            if entry is None or entry[0] is not self:
                entry = attrs[_CACHE] = [self, {}]
            return entry[1]  # type: ignore[no-any-return]
        try:
            return self.weak.setdefault(transport, {})
        except TypeError:  # not weakly referenceable either: decide every time
            return None

    def _choose(self, transport: Any, url: httpx.URL, host: str, sync: bool) -> Any:
        name = self.hosts.lookup(host, url.port, url.scheme, url.path)
        if name is None or isinstance(transport, _GUARDED):
            return transport
        rt = self.guard.runtime(name)
        return GuardedTransport(rt, transport) if sync else AsyncGuardedTransport(rt, transport)


_routes: _Routes | None = None


def _wrapper(original: Callable[[Any, httpx.URL], Any], sync: bool) -> Callable[..., Any]:
    # httpx's own method is a loop over the client's mounts that returns its transport when
    # there are none (the usual client): done inline when nothing else patched it before
    # us, which spares every call a frame: a call to another host went from +1,277 to -521
    # instructions over bare httpx (bench/instrument.py --quick --instructions-only,
    # 2026-12-07).
    own = getattr(original, "__module__", None) == "httpx._client"

    def _transport_for_url(self: Any, url: httpx.URL) -> Any:
        transport = self._transport if own and not self._mounts else original(self, url)
        routes = _routes
        if routes is None:
            return transport
        # The parsed URL as httpx stores it: the host lower case and IDNA-encoded (not
        # ``url.host``, which decodes IDNA on each read; patterns are ASCII). The test
        # below is all a call to another host pays. ``ref`` is a NamedTuple: its fields are
        # read by index, since CPython 3.11 does not specialise reading a NamedTuple's field
        # by name (each is a generic attribute lookup).
        ref = url._uri_reference
        host = ref[2]
        if host not in routes.names:
            tops = routes.tops
            if not tops or host[host.rfind(".") + 1 :] not in tops:
                return transport
        # A client calls one upstream over and over: its last decision, kept on the client
        # (routes, its transport, host, port, scheme, the transport to use) and compared
        # field by field, answers without a call. Against reading the decision kept on the
        # transport (its __dict__ is a generic lookup) and the fields by name: +1,944 ->
        # +1,184 instructions a call over the explicit guard.client() call, and +436 -> +217
        # to another host over a bare call (bench/instrument.py's calls under valgrind, ASLR
        # off, mean of PYTHONHASHSEED 0-3, 2026-12-08). The tuple's type is checked: a
        # client class with __getattr__ may answer for a missing attribute.
        try:
            last = self._gateway_guard_last
        except AttributeError:
            last = None
        if (
            type(last) is tuple
            and last[0] is routes
            and last[1] is transport
            and last[2] == host
            and last[3] == ref[3]
            and last[4] == ref[0]
        ):
            return last[5]
        chosen = routes.decide(transport, url, host, sync)
        if not routes.has_paths:
            # One store: atomic for other threads using the client. Each wrapper made is
            # kept with the transport (decide), so its connection pool is the one reused.
            with contextlib.suppress(AttributeError, TypeError):  # a client that refuses it
                self._gateway_guard_last = (routes, transport, host, ref[3], ref[0], chosen)
        return chosen

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
