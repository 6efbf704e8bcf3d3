"""The request side: what we know and decide before any of the app's code runs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gateway_guard.context import RequestContext, get_context
from gateway_guard.headers import new_request_id, parse_traceparent, valid_request_id

from ._admission import dependency_down, emit_admitted
from ._ids import WATCH, foreign_id

if TYPE_CHECKING:
    from gateway_guard.guard import Guard
    from gateway_guard.routing import Route

_modules = sys.modules
_new = object.__new__


def start(
    guard: Guard,
    method: str,
    path: str,
    request_id: str | bytes | None,
    traceparent: str | bytes | None,
    admit_now: bool = False,
) -> RequestContext:
    """Exemption, route, request id (a valid inbound one is echoed), trace, deadline, and
    whether a dependency of the route is down (``ctx.blocked``).

    ``admit_now``: also take a free shedding slot when that needs no wait, as
    :func:`try_admit` would (``ctx.admitted``): an async adapter's common case in one call.
    The adapter then owes :func:`release` whatever happens, and asks :func:`try_admit`
    only when ``ctx.admitted`` is False (exempt, blocked, or no free slot).
    """
    rid = valid_request_id(request_id) if request_id is not None else None
    # While no id library is loaded (the common case): a len() and a compare, no call.
    if len(_modules) != WATCH.idle and (foreign := foreign_id()) is not None:
        if foreign.outer is not None:
            rid = foreign.outer
        elif rid is None:
            rid = new_request_id()
            foreign.pass_on = True
    else:
        foreign = None
        if rid is None:
            rid = new_request_id()
    trace_id = header = None
    if traceparent is not None:
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            trace_id = parsed[0]
            header = f"00-{trace_id}-{parsed[1]}-{parsed[2]}"
    exempt, route = guard.policies.routes.resolve(method, path)
    # Every slot set here rather than by RequestContext.__init__, which CPython 3.11 calls
    # from C in a frame of its own: -1,190 instructions a request (bench/middleware.py
    # --instructions, 2026-12-07); tests/test_inbound_core.py checks that none is missed.
    # method and path are kept as they came, for log lines and the status page, which
    # bound and escape them only when they show them: two stores, +110 instructions.
    ctx = _new(RequestContext)
    ctx.guard = guard
    ctx.request_id = rid
    ctx.route = route
    ctx.trace_id = trace_id
    ctx.traceparent = header
    ctx.exempt = exempt
    ctx.admitted = False
    ctx._calls = None
    # Only debug mode's Server-Timing reads the calls: no record of each call otherwise.
    ctx.records = guard.debug
    ctx.method = method
    ctx.path = path
    ctx.upstream = None
    ctx.foreign_id = foreign
    if route is None:
        # The clock is read only when something needs it: here, only debug timings.
        ctx.started = guard.clock() if guard.debug else 0.0
        ctx.deadline_at = None
        ctx.blocked = blocked = None
        ctx.priority = "normal"
        ctx.route_key = key = None
    else:
        ctx.started = now = guard.clock()
        ctx.deadline_at = None if route.deadline is None else now + route.deadline
        ctx.blocked = blocked = dependency_down(guard, route) if route.depends_on else None
        ctx.priority = route.priority
        ctx.route_key = key = route.shed_key
    if admit_now and blocked is None and not exempt:
        # try_admit's work without its call: -470 instructions a request
        # (bench/middleware.py --instructions, 2026-12-07).
        shedding = guard.shedding
        if shedding.app.try_acquire() if key is None else shedding.try_admit(key):
            ctx.admitted = True
            if guard.emitter is not None:
                emit_admitted(ctx)
    return ctx


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
        blocked = dependency_down(guard, route)
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
