"""Zero-code instrumentation: an app's own HTTP clients, guarded where they call an upstream.

``instrument(guard)`` patches one seam per client library so that a call whose URL belongs to
a configured upstream (``Guard.upstream_for_url``: its ``base_url`` host and port, or its
``match`` patterns) goes through that upstream's guard, and every other call passes on
untouched. The seams (see each client's module) are chosen so that:

- a call is guarded once: a client the app built with ``guard.client()`` (or a transport
  from ``guard.transport()``) is already guarded and is left alone;
- OpenTelemetry's and Sentry's instrumentation patch other attributes, so they stack in
  either order (theirs see each attempt, or the whole guarded call);
- ``uninstrument()`` puts back exactly what was there.

One Guard is instrumented at a time, process-wide: the last ``instrument(guard)`` wins.
``instrument = ["httpx", ...]`` in the settings applies it when a middleware (ASGI, WSGI,
Flask, Django) is created with that Guard.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._schema import InstrumentedClient

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["PerUpstream", "apply_settings", "instrument", "instrumented", "uninstrument"]

logger = logging.getLogger("gateway_guard")

CLIENTS: Final[tuple[InstrumentedClient, ...]] = ("httpx", "requests", "aiohttp")
# The module that patches each client, and the extra that installs the client.
_MODULES: Final = {
    "httpx": "gateway_guard._instrument_httpx",
    "requests": "gateway_guard._instrument_requests",
    "aiohttp": "gateway_guard._instrument_aiohttp",
}
_EXTRAS: Final = {"httpx": None, "requests": "requests", "aiohttp": "aiohttp"}


class PerUpstream:
    """The instrumented Guard, its host map, and one guarded piece per upstream (a requests
    adapter, an aiohttp middleware), made on first use by ``make``: bounded by the settings."""

    __slots__ = ("guard", "hosts", "lock", "made", "make")

    def __init__(self, guard: Guard, make: Callable[[str], Any]) -> None:
        self.guard = guard
        self.hosts = guard.hosts
        self.make = make
        self.made: dict[str, Any] = {}
        self.lock = threading.Lock()

    def get(self, name: str) -> Any:
        piece = self.made.get(name)
        if piece is None:
            with self.lock:
                piece = self.made.get(name)
                if piece is None:
                    piece = self.made[name] = self.make(name)
        return piece


class Patcher(Protocol):
    """What each client's module provides."""

    def patch(self, guard: Guard) -> None:
        """Install the seam (once) and route matching calls to ``guard``'s upstreams."""

    def unpatch(self) -> None:
        """Remove the seam, restoring exactly what was there."""


_lock = threading.Lock()
_patched: dict[str, Patcher] = {}
_guard: Guard | None = None


def instrument(guard: Guard, clients: Iterable[str] = CLIENTS) -> None:
    """Guard every call that ``clients`` (``"httpx"``, ``"requests"``, ``"aiohttp"``) make to
    a host that belongs to one of ``guard``'s upstreams. Idempotent; the last Guard given
    wins. Raises ValueError for an unknown client and ImportError (naming the extra to
    install) when a client library is missing."""
    names = list(dict.fromkeys(clients))
    for name in names:
        if name not in _MODULES:
            allowed = ", ".join(CLIENTS)
            raise ValueError(f"unknown client {name!r} to instrument (allowed: {allowed})")
    patchers = {name: _load(name) for name in names}
    global _guard
    with _lock:
        if _guard is not None and _guard is not guard:
            logger.info("gateway_guard instrumentation now serves %r", guard)
        _guard = guard
        for patcher in _patched.values():
            patcher.patch(guard)  # the Guard may have changed: route to the new one
        for name, patcher in patchers.items():
            patcher.patch(guard)
            _patched[name] = patcher


def uninstrument() -> None:
    """Undo :func:`instrument`: every patched client is exactly as before. Idempotent."""
    global _guard
    with _lock:
        for patcher in _patched.values():
            patcher.unpatch()
        _patched.clear()
        _guard = None


def instrumented() -> tuple[Guard | None, tuple[str, ...]]:
    """The instrumented Guard (or None) and the clients patched for it."""
    return _guard, tuple(_patched)


def apply_settings(guard: Guard) -> None:
    """Apply the ``instrument`` setting: the adapters call this when they are created."""
    clients = guard.settings.instrument
    if clients:
        instrument(guard, clients)


def _load(name: str) -> Patcher:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        extra = _EXTRAS[name]
        hint = f"pip install 'gateway-guard[{extra}]'" if extra else f"pip install {name}"
        raise ImportError(f"instrumenting {name} needs {name}: {hint}") from exc
    return module.PATCHER  # type: ignore[no-any-return]
