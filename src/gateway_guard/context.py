"""The per-inbound-request context, carried by a ContextVar.

Middlewares (ASGI, WSGI, Django, Flask) set it for the duration of a request; guarded
transports read it to propagate the request id and trace, to use the matched route's
policies and to clip every attempt to the inbound request's deadline. A ContextVar (not a
thread-local) so it follows asyncio tasks, and threads started with ``copy_context``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._schema import Priority
    from .errors import CircuitOpenError
    from .guard import Guard
    from .inbound._ids import ForeignId
    from .routing import Route

__all__ = ["RequestContext", "current_context", "current_guard"]

# Upstream calls remembered per request for logs and debug headers; a request that
# makes thousands of calls must not grow without bound.
MAX_RECORDS = 32


class CallRecord(NamedTuple):
    """One finished upstream call, as the request's diagnostics remember it."""

    upstream: str
    attempts: int
    elapsed: float
    status: int | None
    error: str | None


class RequestContext:
    """What the guard knows and decided about the inbound request being served.

    Middlewares build one per request (see :func:`gateway_guard.inbound.start`); guarded
    transports read it. ``deadline_at`` and ``started`` are on the Guard's clock.

    ``start()`` sets every slot itself rather than call ``__init__`` (cheaper by a frame):
    a slot added here is set there too (tests/test_inbound_core.py checks both).
    """

    __slots__ = (
        "_calls",
        "admitted",
        "blocked",
        "deadline_at",
        "exempt",
        "foreign_id",
        "guard",
        "method",
        "path",
        "priority",
        "records",
        "request_id",
        "route",
        "route_key",
        "started",
        "trace_id",
        "traceparent",
        "upstream",
    )

    def __init__(
        self,
        guard: Guard,
        request_id: str,
        route: Route | None = None,
        deadline_at: float | None = None,
        trace_id: str | None = None,
        started: float = 0.0,
        exempt: bool = False,
        blocked: CircuitOpenError | None = None,
        traceparent: str | None = None,
        method: str = "-",
        path: str = "-",
        records: bool = True,
    ) -> None:
        self.guard = guard
        self.request_id = request_id
        self.route = route
        # time.monotonic()-like value by which the whole inbound request must be answered.
        self.deadline_at = deadline_at
        # The inbound W3C trace id, so outbound traceparents join the caller's trace.
        self.trace_id = trace_id
        # The inbound ``traceparent`` itself (validated), passed on to upstreams as it came
        # when no tracer makes spans of its own: its parent-id is a span that exists.
        self.traceparent = traceparent
        self.started = started
        # Exempt paths are never shed; a route whose dependency is down is answered with
        # ``blocked`` before the app runs.
        self.exempt = exempt
        self.blocked = blocked
        # Whether the request holds an inbound shedding slot: set and cleared by the
        # inbound core, so the slot is given back exactly once whatever the adapter does.
        self.admitted = False
        if route is None:
            self.priority: Priority = "normal"
            self.route_key: int | None = None
        else:
            self.priority = route.priority
            # The key of the route's own shedding limiter, when it has one.
            self.route_key = route.shed_key
        self._calls: list[CallRecord] | None = None
        # Whether the upstream calls are recorded (``calls``): only debug mode's
        # Server-Timing reads them, so the middlewares record only with ``debug = true``.
        self.records = records
        # For log lines and the status page: the raw path is only ever shown bounded and
        # escaped (gateway_guard.log), never used as a key.
        self.method = method
        self.path = path
        # The upstream this request is calling, or called last (log records' ``upstream``).
        self.upstream: str | None = None
        # Set when another library (asgi-correlation-id, django-guid) owns the request id:
        # see gateway_guard.inbound._ids.
        self.foreign_id: ForeignId | None = None

    @property
    def calls(self) -> list[CallRecord]:
        """The upstream calls made for this request so far (at most MAX_RECORDS)."""
        return self._calls if self._calls is not None else []

    @property
    def wants_records(self) -> bool:
        """False when calls are not recorded, or once MAX_RECORDS are: callers skip
        building more."""
        calls = self._calls
        return self.records and (calls is None or len(calls) < MAX_RECORDS)

    def record(self, call: CallRecord) -> None:
        calls = self._calls
        if calls is None:
            self._calls = [call]
        elif len(calls) < MAX_RECORDS:
            calls.append(call)

    def __repr__(self) -> str:
        route = self.route.name if self.route is not None else None
        return f"<RequestContext {self.request_id} route={route!r}>"


_current: ContextVar[RequestContext | None] = ContextVar("gateway_guard_request", default=None)

# Bound once: the transports and middlewares call these on every request.
get_context = _current.get
set_context = _current.set
reset_context = _current.reset


def current_context() -> RequestContext | None:
    """The context of the inbound request being served, or None outside one."""
    return _current.get()


def current_guard() -> Guard:
    """The :class:`Guard` serving the current inbound request (any framework).

    Raises :class:`LookupError` outside a request handled by a gateway_guard middleware.
    """
    ctx = _current.get()
    if ctx is None:
        raise LookupError(
            "gateway_guard.current_guard() was called outside a request served by a "
            "gateway_guard middleware"
        )
    return ctx.guard
