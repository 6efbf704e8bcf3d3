"""The inbound decision core shared by every middleware (ASGI, WSGI, Django, Flask).

Framework adapters translate their request into (method, path, a few headers), call
:func:`start`, and turn what comes back into their own response type. Everything that is
a decision — exemption, route, request id, dependency check, error mapping, logging —
lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from .breaker import BreakerState
from .context import RequestContext, get_context
from .errors import CircuitOpenError, LoadShedError, UpstreamError, from_exception
from .headers import new_request_id, parse_traceparent, valid_request_id

if TYPE_CHECKING:
    from .guard import Guard
    from .render import RenderedError
    from .routing import Route

__all__ = [
    "as_upstream_error",
    "inbound_shed",
    "log_gateway_error",
    "render_error",
    "start",
    "view_policy",
]

logger = logging.getLogger("gateway_guard")

_ADMITTING = (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.DISABLED)


def start(
    guard: Guard,
    method: str,
    path: str,
    request_id: str | bytes | None,
    traceparent: str | bytes | None,
) -> RequestContext:
    """Decide what to do with an inbound request before any of the app's code runs."""
    rid = valid_request_id(request_id) if request_id is not None else None
    if rid is None:
        rid = new_request_id()
    trace_id = None
    if traceparent is not None:
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            trace_id = parsed[0]
    exempt, route = guard.policies.routes.resolve(method, path)
    if route is None:
        # The clock is read only when something needs it: here, only debug timings.
        now = guard.clock() if guard.settings.debug else 0.0
        return RequestContext(guard, rid, None, None, trace_id, now, exempt)
    clock = guard.clock  # a local first: CPython 3.11 cannot specialise obj.attr() calls
    now = clock()
    deadline_at = None if route.deadline is None else now + route.deadline
    blocked = _dependency_down(guard, route) if route.depends_on else None
    return RequestContext(guard, rid, route, deadline_at, trace_id, now, exempt, blocked)


def _dependency_down(guard: Guard, route: Route) -> CircuitOpenError | None:
    """A 503 to answer at once when an upstream the route needs has its breaker open.

    Half-open lets the request through: it may be the probe that closes the breaker.
    """
    for name in route.depends_on:
        breaker = guard.breaker(name)
        if breaker.state not in _ADMITTING:
            return CircuitOpenError(
                f"route {route.name!r} depends on upstream {name!r}, whose breaker is open",
                upstream=name,
                retry_after=breaker.retry_after(),
            )
    return None


def as_upstream_error(exc: BaseException) -> UpstreamError | None:
    """The gateway error to render for ``exc``, or None when it is not ours to answer.

    An ``httpx.TransportError`` the app did not catch (an unguarded client) is still an
    upstream failure: classify it rather than let it become a bare 500.
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, httpx.TransportError) or (
        isinstance(exc, BaseExceptionGroup) and _holds_upstream_failure(exc)
    ):
        error = from_exception(exc)
        if error.__cause__ is None:
            error.__cause__ = exc
        return error
    return None


def _holds_upstream_failure(group: BaseExceptionGroup[BaseException]) -> bool:
    """A task group whose failure was an upstream's (anyio/asyncio wrap errors in groups)."""
    matched, _ = group.split(lambda e: isinstance(e, UpstreamError | httpx.TransportError))
    return matched is not None


class _Throttle:
    """At most one log line per key per interval, then a count of what was held back.

    Keys are (upstream name, error type): bounded by the settings and RFC 9209's registry,
    never by anything a client sends.
    """

    __slots__ = ("_interval", "_lock", "_state")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._state: dict[tuple[str | None, str | None], tuple[float, int]] = {}

    def admit(self, key: tuple[str | None, str | None], now: float) -> int | None:
        """None to hold this line back; else how many were held back before it."""
        with self._lock:
            last, held = self._state.get(key, (-1e18, 0))
            if now - last < self._interval:
                self._state[key] = (last, held + 1)
                return None
            if len(self._state) > 1024:  # belt and braces: keys are bounded anyway
                self._state.clear()
            self._state[key] = (now, 0)
            return held


_throttle = _Throttle()


def inbound_shed(exc: LoadShedError) -> LoadShedError:
    """An inbound shed names no upstream (the limiter's name is not one)."""
    exc.upstream = None
    return exc


def log_gateway_error(ctx: RequestContext, error: UpstreamError, *, started: bool = False) -> None:
    """Log a gateway error with fields JSON log setups can pick up.

    At most one line per second per upstream and error type (``suppressed`` counts the
    rest). Failures (502/504) log at ERROR with the exception; shedding and open breakers
    (503) are expected under load: WARNING, without a traceback.
    """
    # One line per second per upstream and error type, with a count of what was held
    # back: an outage of thousands of failures a second must not bury the logs.
    held = _throttle.admit((error.upstream, error.proxy_error), time.monotonic())
    if held is None:
        return
    expected = error.status == 503
    route = ctx.route
    fields = {
        "request_id": ctx.request_id,
        "route": route.name if route is not None else None,
        "upstream": error.upstream,
        "proxy_error": error.proxy_error,
        "status": error.status,
        "received_status": error.received_status,
        "attempts": error.attempts,
        "elapsed": round(error.elapsed, 6),
        "response_started": started,
        "suppressed": held,
    }
    logger.log(
        logging.WARNING if expected else logging.ERROR,
        "gateway error %s %s on %s (upstream %s, request %s)%s%s",
        error.status,
        error.proxy_error or f"received-status={error.received_status}",
        fields["route"] or "-",
        error.upstream or "-",
        ctx.request_id,
        " after the response started" if started else "",
        f" (+{held} like it in the last second)" if held else "",
        extra=fields,
        exc_info=None if expected else error,
    )


def render_error(
    guard: Guard, ctx: RequestContext, error: UpstreamError, accept: str | None, method: str
) -> RenderedError:
    """The response for ``error``; never raises (the renderer falls back to plain text)."""
    timings: list[tuple[str, float, str | None]] = []
    if guard.settings.debug:
        total = guard.clock() - ctx.started
        timings.append(("total", total, None))
        for call in ctx.calls:
            timings.append((f"upstream-{call.upstream}", call.elapsed, call.error))
    return guard.renderer.render(
        error, request_id=ctx.request_id, accept=accept, method=method, timings=timings
    )


@contextlib.contextmanager
def view_policy(route: Route) -> Iterator[None]:
    """Apply a per-view policy (Flask's ``@ext.policy``, Django's ``@gateway_policy``)
    to the current request while the view runs.

    The view's upstream policies replace the route's, its deadline can only shorten the
    request's, and a dependency whose breaker is open answers 503 before the view runs
    (raised, so the framework's own error handling renders it).
    """
    ctx = get_context()
    if ctx is None:
        yield  # called outside a guarded request (a unit test of the view): nothing to do
        return
    guard = ctx.guard
    if route.depends_on:
        blocked = _dependency_down(guard, route)
        if blocked is not None:
            raise blocked
    saved = ctx.route, ctx.deadline_at
    ctx.route = route
    if route.deadline is not None:
        deadline_at = guard.clock() + route.deadline
        if ctx.deadline_at is None or deadline_at < ctx.deadline_at:
            ctx.deadline_at = deadline_at
    try:
        yield
    finally:
        ctx.route, ctx.deadline_at = saved
