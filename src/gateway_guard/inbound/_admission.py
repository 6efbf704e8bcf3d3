"""Admission: whether an inbound request may run the app now, later, or not at all.

A request is refused (answered by us, without running the app) when a dependency of its
route has its breaker open, or when inbound shedding has no slot for it. Exempt paths are
never shed. What a request takes it gives back once, in :func:`release`, whichever way
the adapter finishes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway_guard.breaker import BreakerState
from gateway_guard.errors import CircuitOpenError, LoadShedError, UpstreamError
from gateway_guard.events import InboundAdmitted, InboundReleased, InboundShed

from ._ids import forget

if TYPE_CHECKING:
    from gateway_guard.context import RequestContext
    from gateway_guard.guard import Guard
    from gateway_guard.routing import Route

_ADMITTING = (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.DISABLED)


def dependency_down(guard: Guard, route: Route) -> CircuitOpenError | None:
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


def inbound_shed(exc: LoadShedError) -> LoadShedError:
    """An inbound shed names no upstream (the limiter's name is not one)."""
    exc.upstream = None
    return exc


def admit(ctx: RequestContext) -> UpstreamError | None:
    """Admit the request, waiting in the queue if it must (a thread blocks).

    Returns the error to answer with instead of running the app, or None once admitted.
    """
    if ctx.blocked is not None:
        return _refused(ctx, ctx.blocked)
    if ctx.exempt:
        return None
    try:
        ctx.guard.shedding.admit(ctx.route_key, ctx.priority)
    except LoadShedError as exc:
        return _refused(ctx, inbound_shed(exc))
    ctx.admitted = True
    emit_admitted(ctx)
    return None


def try_admit(ctx: RequestContext) -> bool:
    """Admit the request if that needs no wait; True when it may run the app now.

    False (holding nothing) sends the caller to :func:`admit_async`, which queues, sheds
    or answers a blocked route. Split so the common case of an async adapter creates no
    coroutine.
    """
    if ctx.blocked is not None:
        return False
    if ctx.exempt:
        return True
    guard = ctx.guard
    shedding = guard.shedding
    key = ctx.route_key
    # A route without a limiter of its own (most) takes the app's directly, a frame
    # fewer than through InboundShedding.try_admit: -630 instructions a request
    # (bench/middleware.py --instructions, 2026-12-07, with start() not admitting).
    if not (shedding.app.try_acquire() if key is None else shedding.try_admit(key)):
        return False
    ctx.admitted = True
    if guard.emitter is not None:
        emit_admitted(ctx)
    return True


async def admit_async(ctx: RequestContext) -> UpstreamError | None:
    """Like :func:`admit`, suspending instead of blocking while queued."""
    if ctx.blocked is not None:
        return _refused(ctx, ctx.blocked)
    if ctx.exempt:
        return None
    try:
        await ctx.guard.shedding.admit_async(ctx.route_key, ctx.priority)
    except LoadShedError as exc:
        return _refused(ctx, inbound_shed(exc))
    ctx.admitted = True
    emit_admitted(ctx)
    return None


def release(ctx: RequestContext) -> None:
    """Give back what admission took; does nothing the second time, or if nothing was."""
    if ctx.admitted:
        ctx.admitted = False
        guard = ctx.guard
        key = ctx.route_key
        # As in try_admit: -590 instructions a request (bench/middleware.py
        # --instructions, 2026-12-07).
        if key is None:
            guard.shedding.app.release()
        else:
            guard.shedding.release(key)
        hooks = guard.emitter
        if hooks is not None and hooks.wants(InboundReleased):
            hooks.emit(InboundReleased(_route(ctx)))
    if ctx.foreign_id is not None:
        forget(ctx.foreign_id)


# --- events (built only when heard: guard.emitter is set and wants it) ----------------------


def _route(ctx: RequestContext) -> str | None:
    route = ctx.route
    return route.name if route is not None else None


def emit_admitted(ctx: RequestContext) -> None:
    """InboundAdmitted, for the hooks that hear it."""
    hooks = ctx.guard.emitter
    # Built only when a hook hears it: a hook on other events only (tracing's) no longer
    # pays for two events a request: -6,400 instructions (bench/middleware.py
    # --instructions, 2026-12-07, "+ a hook").
    if hooks is not None and hooks.wants(InboundAdmitted):
        hooks.emit(InboundAdmitted(_route(ctx)))


def _refused(ctx: RequestContext, error: UpstreamError) -> UpstreamError:
    hooks = ctx.guard.emitter
    if hooks is not None and hooks.wants(InboundShed):
        hooks.emit(
            InboundShed(
                _route(ctx), _shed_reason(error), ctx.priority, error.upstream, error.retry_after
            )
        )
    return error


def _shed_reason(error: UpstreamError) -> str:
    # A bounded label for metrics, from what the limiter says (_concurrency._shed_error):
    # "no free slot" / "queue full" come at once, a timeout or an eviction after a wait.
    if isinstance(error, CircuitOpenError):
        return "dependency_down"
    if "evicted" in str(error):
        return "evicted"
    return "queue_timeout" if error.elapsed else "capacity"
