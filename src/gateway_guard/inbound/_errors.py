"""What a gateway error becomes: which exceptions are ours, the log line, the page."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING

import httpx

from gateway_guard import _fork
from gateway_guard._sentry import capture
from gateway_guard.errors import UpstreamError, from_exception
from gateway_guard.log import safe_path

from ._response import AppError

if TYPE_CHECKING:
    from gateway_guard.context import RequestContext
    from gateway_guard.guard import Guard
    from gateway_guard.render import RenderedError

logger = logging.getLogger("gateway_guard")

# An unguarded httpx client's failures that are still the upstream's: a transport error,
# or a corrupt Content-Encoding (raised above the transport, where no guard sees it).
_CLIENT_FAILURES = (httpx.TransportError, httpx.DecodingError)
#: Everything answered as a gateway error when the app lets it escape: one list for the
#: core and for adapters that register handlers by class (Flask).
GATEWAY_EXCEPTIONS: tuple[type[Exception], ...] = (UpstreamError, *_CLIENT_FAILURES)


def as_upstream_error(exc: BaseException) -> UpstreamError | None:
    """The gateway error to render for ``exc``, or None when it is not ours to answer.

    An ``httpx.TransportError`` the app did not catch (an unguarded client) is still an
    upstream failure: classify it rather than let it become a bare 500. So is an
    ``httpx.DecodingError`` (a corrupt ``Content-Encoding``), which httpx raises above the
    transport, where no guard can turn it into an UpstreamError.
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, _CLIENT_FAILURES) or (
        isinstance(exc, BaseExceptionGroup) and _holds_upstream_failure(exc)
    ):
        error = from_exception(exc)
        if error.__cause__ is None:
            error.__cause__ = exc
        return error
    return None


def _holds_upstream_failure(group: BaseExceptionGroup[BaseException]) -> bool:
    """A task group whose failure was an upstream's (anyio/asyncio wrap errors in groups)."""
    matched, _ = group.split(lambda e: isinstance(e, GATEWAY_EXCEPTIONS))
    return matched is not None


class _Throttle:
    """At most one log line per key per interval, then a count of what was held back.

    Keys are (upstream name, error type): bounded by the settings and RFC 9209's registry,
    never by anything a client sends.
    """

    __slots__ = ("__weakref__", "_interval", "_lock", "_state")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._state: dict[tuple[str | None, str | None], tuple[float, int]] = {}
        _fork.register(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a forked child's copy may be held for ever

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


def log_gateway_error(ctx: RequestContext, error: UpstreamError, *, started: bool = False) -> None:
    """Log a gateway error as one WARNING line naming the request, with fields JSON log
    setups can pick up; remember it for the status page; show it to Sentry.

    At most one line per second per upstream and error type (``suppressed`` counts the
    rest). An upstream failing is expected, not our bug: no traceback, unless ``debug``
    is on. A configuration error (500) is ours to fix: ERROR, with its traceback.
    """
    guard = ctx.guard
    recent = guard.recent_errors
    if recent is not None:
        recent.add(ctx, error, started)
    # One line per second per upstream and error type, with a count of what was held
    # back: an outage of thousands of failures a second must not bury the logs.
    held = _throttle.admit((error.upstream, error.proxy_error), time.monotonic())
    if held is None:
        return
    ours = error.status == 500
    route = ctx.route
    host = _host(error) if error.upstream is None else None
    fields = {
        "request_id": ctx.request_id,
        "route": route.name if route is not None else None,
        "method": ctx.method,
        "path": safe_path(ctx.path),
        "upstream": error.upstream,
        "upstream_host": host,
        "proxy_error": error.proxy_error,
        "status": error.status,
        "received_status": error.received_status,
        "attempts": error.attempts,
        "elapsed": round(error.elapsed, 6),
        "response_started": started,
        "suppressed": held,
    }
    logger.log(
        logging.ERROR if ours else logging.WARNING,
        "gateway error %s %s on %s %s (upstream %s, request %s, %s attempt(s), %.3f s)%s%s",
        error.status,
        error.proxy_error or f"received-status={error.received_status}",
        ctx.method,
        fields["route"] or fields["path"],
        error.upstream or (f"- at {host}" if host else "-"),
        ctx.request_id,
        error.attempts,
        error.elapsed,
        " after the response started" if started else "",
        f" (+{held} like it in the last second)" if held else "",
        extra=fields,
        exc_info=error if ours or guard.settings.debug else None,
    )
    capture(error, fields)


def _host(error: UpstreamError) -> str | None:
    """The host an unguarded client called (httpx's request), for the log line only."""
    cause = error.__cause__
    if isinstance(cause, httpx.RequestError):
        try:
            return safe_path(cause.request.url.netloc.decode("ascii", "replace"))
        except RuntimeError:  # raised by httpx when the error carries no request
            return None
    return None


def render_error(
    guard: Guard,
    ctx: RequestContext,
    error: UpstreamError,
    accept: str | bytes | None,
    method: str,
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


def respond(
    ctx: RequestContext, failure: UpstreamError | AppError, accept: str | bytes | None, method: str
) -> RenderedError:
    """Our page for a refusal, a gateway error or the app's own 502/503/504; never raises.

    A gateway error is logged here (:func:`log_gateway_error`), once, by whichever
    adapter answers it.
    """
    if isinstance(failure, AppError):
        rendered = ctx.guard.renderer.render_status(
            failure.status,
            request_id=ctx.request_id,
            accept=accept,
            method=method,
            retry_after=failure.retry_after,
        )
    else:
        log_gateway_error(ctx, failure)
        rendered = render_error(ctx.guard, ctx, failure, accept, method)
    foreign = ctx.foreign_id
    if foreign is not None and foreign.answers_header:
        # asgi-correlation-id, outside us, appends the same X-Request-ID itself.
        headers = [(k, v) for k, v in rendered.headers if k != "x-request-id"]
        rendered = dataclasses.replace(rendered, headers=headers)
    return rendered
