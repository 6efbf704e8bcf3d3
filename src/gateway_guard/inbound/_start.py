"""The request side: what we know and decide before any of the app's code runs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gateway_guard.context import RequestContext, get_context
from gateway_guard.headers import new_request_id, parse_traceparent, valid_request_id

from ._admission import dependency_down
from ._ids import ID_MODULES, foreign_id

if TYPE_CHECKING:
    from gateway_guard.guard import Guard
    from gateway_guard.routing import Route

_modules = sys.modules
_ASGI_IDS, _DJANGO_IDS = ID_MODULES


def start(
    guard: Guard,
    method: str,
    path: str,
    request_id: str | bytes | None,
    traceparent: str | bytes | None,
) -> RequestContext:
    """Exemption, route, request id (a valid inbound one is echoed), trace, deadline, and
    whether a dependency of the route is down (``ctx.blocked``)."""
    rid = valid_request_id(request_id) if request_id is not None else None
    # Two dict lookups when no id library is loaded (the common case), and no call.
    foreign = foreign_id() if _ASGI_IDS in _modules or _DJANGO_IDS in _modules else None
    if foreign is not None and foreign.outer is not None:
        rid = foreign.outer
    elif rid is None:
        rid = new_request_id()
        if foreign is not None:
            foreign.pass_on = True
    trace_id = header = None
    if traceparent is not None:
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            trace_id = parsed[0]
            header = f"00-{trace_id}-{parsed[1]}-{parsed[2]}"
    exempt, route = guard.policies.routes.resolve(method, path)
    if route is None:
        # The clock is read only when something needs it: here, only debug timings.
        now = guard.clock() if guard.settings.debug else 0.0
        ctx = RequestContext(
            guard, rid, None, None, trace_id, now, exempt, None, header, method, path
        )
    else:
        now = guard.clock()
        deadline_at = None if route.deadline is None else now + route.deadline
        blocked = dependency_down(guard, route) if route.depends_on else None
        ctx = RequestContext(
            guard, rid, route, deadline_at, trace_id, now, exempt, blocked, header, method, path
        )
    if foreign is not None:
        ctx.foreign_id = foreign
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
