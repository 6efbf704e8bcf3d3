"""What a gateway error becomes: which exceptions are ours, the log line, the page."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING

import httpx

from gateway_guard import _fork
from gateway_guard._negotiate import Wants
from gateway_guard._sentry import capture
from gateway_guard.errors import UpstreamError, UpstreamStatusError, from_exception
from gateway_guard.events import GatewayErrorAnswered
from gateway_guard.headers import parse_retry_after
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
#: core and for adapters that register handlers by class (Flask). The failures of clients
#: that are optional extras (requests, urllib3, aiohttp) are recognised by name, without
#: importing them (:func:`as_upstream_error`): an adapter that registers by class adds a
#: handler for ``Exception`` that answers them and re-raises anything else.
GATEWAY_EXCEPTIONS: tuple[type[Exception], ...] = (
    UpstreamError,
    *_CLIENT_FAILURES,
    httpx.HTTPStatusError,
)

# The transport failures of the optional clients, by the qualified names of their classes
# (looked up along the exception's MRO): importing them here would import the extras.
_FAILURE_NAMES = frozenset(
    {
        "requests.exceptions.ConnectionError",  # ConnectTimeout, SSLError, ProxyError too
        "requests.exceptions.Timeout",  # ReadTimeout
        "requests.exceptions.ChunkedEncodingError",
        "requests.exceptions.ContentDecodingError",
        "urllib3.exceptions.TimeoutError",  # connect and read timeouts, NewConnectionError
        "urllib3.exceptions.ProtocolError",
        "urllib3.exceptions.SSLError",
        "urllib3.exceptions.ProxyError",
        "urllib3.exceptions.DecodeError",
        "urllib3.exceptions.MaxRetryError",
        "aiohttp.client_exceptions.ClientConnectionError",  # connector, disconnects, timeouts
        "aiohttp.client_exceptions.ClientPayloadError",
        "aiohttp.client_exceptions.ClientHttpProxyError",
    }
)
# Raised by raise_for_status(): the upstream answered; a 5xx is its failure, a 4xx the app's.
_STATUS_NAMES = frozenset(
    {"requests.exceptions.HTTPError", "aiohttp.client_exceptions.ClientResponseError"}
)
# aiohttp reports a response it could not parse as a ClientResponseError caused by one.
_AIOHTTP_PARSE_ERROR = "aiohttp.http_exceptions.HttpProcessingError"
_OPTIONAL_CLIENTS = ("requests", "urllib3", "aiohttp")


def _names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


def _is_client_failure(exc: BaseException) -> bool:
    if isinstance(exc, _CLIENT_FAILURES):
        return True
    if not type(exc).__module__.startswith(_OPTIONAL_CLIENTS):
        return False  # the common case, and the cheap test
    names = _names(exc)
    if not names.isdisjoint(_FAILURE_NAMES):
        return True
    cause = exc.__cause__
    return (
        "aiohttp.client_exceptions.ClientResponseError" in names
        and cause is not None
        and _AIOHTTP_PARSE_ERROR in _names(cause)
    )


def _failure_status(exc: BaseException) -> int | None:
    """The 5xx an uncaught ``raise_for_status()`` error carries, else None."""
    if isinstance(exc, httpx.HTTPStatusError):
        status: object = exc.response.status_code
    elif type(exc).__module__.startswith(_OPTIONAL_CLIENTS) and not _names(exc).isdisjoint(
        _STATUS_NAMES
    ):
        response = getattr(exc, "response", None)
        # requests' response.status_code; aiohttp's error carries the status itself.
        status = getattr(response, "status_code", None) if response is not None else None
        if status is None and type(exc).__qualname__ == "ClientResponseError":
            status = getattr(exc, "status", None)
    else:
        return None
    return status if isinstance(status, int) and 500 <= status <= 599 else None


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or getattr(exc, "headers", None)
    try:
        value = headers.get("retry-after") if headers is not None else None
    except Exception:  # a header object we do not know: no Retry-After, no crash
        return None
    return parse_retry_after(value) if isinstance(value, str) else None


def as_upstream_error(exc: BaseException) -> UpstreamError | None:
    """The gateway error to render for ``exc``, or None when it is not ours to answer.

    A transport error of an unguarded client the app did not catch (httpx, requests,
    urllib3, aiohttp) is still an upstream failure: classify it rather than let it become
    a bare 500. So is an ``httpx.DecodingError`` (a corrupt ``Content-Encoding``), which
    httpx raises above the transport, where no guard can turn it into an UpstreamError.
    An uncaught ``raise_for_status()`` error for a 5xx is the upstream's failure too (502,
    ``received-status``); for a 4xx it stays the app's error.
    """
    if isinstance(exc, UpstreamError):
        return exc
    if _is_client_failure(exc) or (
        isinstance(exc, BaseExceptionGroup) and _holds_upstream_failure(exc)
    ):
        error = from_exception(exc)
        if error.__cause__ is None:
            error.__cause__ = exc
        return error
    status = _failure_status(exc)
    if status is not None:
        error = UpstreamStatusError(
            f"upstream answered {status} (raise_for_status)",
            received_status=status,
            retry_after=_retry_after(exc),
        )
        error.__cause__ = exc
        return error
    return None


def _holds_upstream_failure(group: BaseExceptionGroup[BaseException]) -> bool:
    """A task group whose failure was an upstream's (anyio/asyncio wrap errors in groups)."""
    matched, _ = group.split(
        lambda e: isinstance(e, UpstreamError) or _is_client_failure(e) or bool(_failure_status(e))
    )
    return matched is not None


def name_upstream(guard: Guard, error: UpstreamError) -> None:
    """Name the upstream of an unguarded client's failure, where its URL is one's.

    Uses ``Guard.upstream_for_url`` (issue #12's host matching) when this Guard has it.
    """
    if error.upstream is not None:
        return
    lookup = getattr(guard, "upstream_for_url", None)
    url = _url_of(error.__cause__)
    if lookup is not None and url is not None:
        try:
            error.upstream = lookup(url)
        except Exception:  # naming is for the log line: never turn a 502 into a 500
            logger.debug("could not name the upstream of %s", url, exc_info=True)


def _url_of(exc: BaseException | None) -> str | None:
    """The URL an unguarded client's exception was about, where it says (best effort)."""
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        try:
            request = getattr(exc, "request", None)  # httpx raises when it has none
        except RuntimeError:
            request = None
        url = getattr(request, "url", None)
        if url is None:
            info = getattr(exc, "request_info", None)  # aiohttp
            url = getattr(info, "url", None) or getattr(exc, "url", None)
        if url is not None:
            return str(url)
        exc = exc.__cause__ or exc.__context__
    return None


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
    name_upstream(ctx.guard, error)
    guard = ctx.guard
    if guard.emitter is not None:
        _answered(ctx, error, started)
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
    wants: Wants,
    method: str,
) -> RenderedError:
    """The response for ``error``; never raises (the renderer falls back to plain text).

    ``wants`` is what the request's headers ask for (body, language): see
    :class:`gateway_guard._negotiate.Wants`.
    """
    timings: list[tuple[str, float, str | None]] = []
    if guard.settings.debug:
        total = guard.clock() - ctx.started
        timings.append(("total", total, None))
        for call in ctx.calls:
            timings.append((f"upstream-{call.upstream}", call.elapsed, call.error))
    return guard.renderer.render(
        error, request_id=ctx.request_id, wants=wants, method=method, timings=timings
    )


def respond(
    ctx: RequestContext,
    failure: UpstreamError | AppError,
    wants: Wants | str | bytes | None,
    method: str,
) -> RenderedError:
    """Our page for a refusal, a gateway error or the app's own 502/503/504; never raises.

    A gateway error is logged here (:func:`log_gateway_error`), once, by whichever
    adapter answers it. ``wants`` is what the request asks for (an ``Accept`` value alone
    is taken as such).
    """
    if not isinstance(wants, Wants):
        wants = Wants(accept=wants.decode("latin-1") if isinstance(wants, bytes) else wants)
    if isinstance(failure, AppError):
        rendered = ctx.guard.renderer.render_status(
            failure.status,
            request_id=ctx.request_id,
            wants=wants,
            method=method,
            retry_after=failure.retry_after,
        )
    else:
        log_gateway_error(ctx, failure)
        rendered = render_error(ctx.guard, ctx, failure, wants, method)
    foreign = ctx.foreign_id
    if foreign is not None and foreign.answers_header:
        # asgi-correlation-id, outside us, appends the same X-Request-ID itself.
        headers = [(k, v) for k, v in rendered.headers if k != "x-request-id"]
        rendered = dataclasses.replace(rendered, headers=headers)
    return rendered


def _answered(ctx: RequestContext, error: UpstreamError, started: bool) -> None:
    """The GatewayErrorAnswered event (the status page's recent errors can hear it)."""
    hooks = ctx.guard.emitter
    if hooks is not None:
        route = ctx.route
        hooks.emit(
            GatewayErrorAnswered(
                ctx.request_id,
                route.name if route is not None else None,
                error.upstream,
                error.status,
                error.proxy_error,
                error.received_status,
                error.attempts,
                error.elapsed,
                started,
                error,
            )
        )
