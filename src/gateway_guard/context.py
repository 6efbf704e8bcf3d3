"""The per-inbound-request context, carried by a ContextVar.

Middlewares (ASGI, WSGI, Django, Flask) set it for the duration of a request; guarded
transports read it to propagate the request id and trace, to use the matched route's
policies and to clip every attempt to the inbound request's deadline. A ContextVar (not a
thread-local) so it follows asyncio tasks, and threads started with ``copy_context``.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .guard import Guard
    from .routing import Route

__all__ = ["CallRecord", "RequestContext", "current_context", "current_guard"]

# Upstream calls remembered per request for logs and debug headers; a request that
# makes thousands of calls must not grow without bound.
MAX_RECORDS = 32


@dataclass(slots=True, frozen=True)
class CallRecord:
    """One finished upstream call, as the request's diagnostics remember it."""

    upstream: str
    attempts: int
    elapsed: float
    status: int | None
    error: str | None


@dataclass(slots=True, eq=False)
class RequestContext:
    """What the guard knows about the inbound request being served."""

    guard: Guard
    request_id: str
    route: Route | None = None
    # time.monotonic() value by which the whole inbound request must be answered.
    deadline_at: float | None = None
    # The inbound W3C trace id, so outbound traceparents join the caller's trace.
    trace_id: str | None = None
    calls: list[CallRecord] = field(default_factory=list)

    def record(self, call: CallRecord) -> None:
        if len(self.calls) < MAX_RECORDS:
            self.calls.append(call)


_current: ContextVar[RequestContext | None] = ContextVar("gateway_guard_request", default=None)

# Bound once: the transports call these on every request.
get_context = _current.get
set_context = _current.set


def reset_context(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


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
