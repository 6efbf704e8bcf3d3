"""OpenTelemetry spans, built on the event hooks (the ``otel`` extra: opentelemetry-api).

Imported only when ``[tracing] enabled = true``: ``import gateway_guard`` never imports
OpenTelemetry. Only the API is used; your SDK setup (or none) decides where spans go.

Each guarded call is one span (``{method} {upstream}``, kind INTERNAL), the child of
whatever span is current (the inbound request's, under an instrumented framework). Each
attempt is a child CLIENT span (``{method}``) with the HTTP client semantic conventions:
``http.request.method``, ``server.address`` / ``server.port``,
``http.response.status_code``, ``error.type``, and ``http.request.resend_count`` (1, 2,
...) on the attempts after the first. OpenTelemetry's propagator injects each attempt's
context into its request headers. While an attempt is sent, HTTP instrumentation is
suppressed (OpenTelemetry's own flag), so opentelemetry-instrumentation-httpx (or
-requests, -aiohttp-client) does not add a second span for the same request.

The call span carries ``gateway_guard.upstream``, ``gateway_guard.route``, the breaker's
state when the call began, and at its end ``gateway_guard.outcome``,
``gateway_guard.attempts`` and ``gateway_guard.proxy_error``; span events mark retries
and breaker rejections. Bulkhead rejections and inbound shedding add an event to the
current span. ``http.client.request.duration`` (seconds) is recorded per attempt through
the API's meter, a no-op until a meter provider is set.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "gateway_guard's tracing needs opentelemetry-api: pip install 'gateway-guard[otel]'"
    ) from exc

from .context import current_context
from .events import (
    AttemptEnded,
    AttemptStarted,
    BreakerRejected,
    BulkheadRejected,
    CallEndCallback,
    CallEnded,
    CallOutcome,
    InboundShed,
    RetryScheduled,
)

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["attach"]

# The key HTTP instrumentations check before making a span of their own. It lives in the
# API's context module; an API too old to have it has instrumentations that do not check.
_SUPPRESS_HTTP = getattr(otel_context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None)
# Calls whose spans are open at once; reached only if ends were lost (a bug): then the
# oldest are dropped rather than grow without bound.
_MAX_OPEN_CALLS = 10_000
# What the API answers until an SDK sets a provider: then every span and measurement is a
# no-op, and a call skips them all (bench/observability.py). The meter's proxy class is
# private to the API: without it, a meter provider counts as set.
try:
    from opentelemetry.metrics import _internal as _metrics_internal
    from opentelemetry.metrics._internal import _ProxyMeterProvider as _NoMeterProvider
except ImportError:  # pragma: no cover - another API version
    _metrics_internal = None  # type: ignore[assignment]

    class _NoMeterProvider:  # type: ignore[no-redef]
        pass


def _providers_unset() -> bool:
    """True while neither global provider is set, read from the API's own globals.

    The public getters look ``os.environ`` up on every call until a provider is set
    (~4,000 instructions for both, on every call made while no SDK is configured); the
    globals are one attribute read each. An API without them takes the public way.
    """
    tracer = getattr(trace, "_TRACER_PROVIDER", False)
    meter = getattr(_metrics_internal, "_METER_PROVIDER", False)
    if tracer is False or meter is False:
        return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and isinstance(
            otel_metrics.get_meter_provider(), _NoMeterProvider
        )
    return tracer is None and meter is None and not _FROM_ENVIRONMENT


_HOSTS_CACHED = 256
# Providers named in the environment are loaded by the API's getters on first use.
_FROM_ENVIRONMENT = any(
    name in os.environ for name in ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")
)


class _Call:
    __slots__ = ("attempt", "span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.attempt: Span | None = None
        self.token: object | None = None


def _server(headers: Any) -> dict[str, Any]:
    """``server.address`` / ``server.port`` from the request's Host field."""
    host = headers.get("host")
    if not host:
        return {}
    found = _hosts.get(host)
    if found is None:
        found = _parse_host(host)
        if len(_hosts) >= _HOSTS_CACHED:  # bounded: hosts are the app's upstreams
            _hosts.clear()
        _hosts[host] = found
    return found


_hosts: dict[str, dict[str, Any]] = {}


def _parse_host(host: str) -> dict[str, Any]:
    if host.startswith("["):  # an IPv6 literal: its colons are the address's own
        address, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        address, _, port = host.partition(":")
    found: dict[str, Any] = {"server.address": address}
    if port.isdigit():
        found["server.port"] = int(port)
    return found


class _Tracing:
    """One Guard's hooks into OpenTelemetry."""

    def __init__(self, guard: Guard) -> None:
        from gateway_guard import __version__  # noqa: PLC0415 - the package is loaded by now

        self.guard = guard
        self.tracer = trace.get_tracer("gateway_guard", __version__)
        meter = otel_metrics.get_meter("gateway_guard", __version__)
        self.duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests (one per attempt).",
        )
        self.calls: dict[int, _Call] = {}
        self._lock = threading.Lock()
        self._live = False
        self.unprobe: Callable[[], None] | None = None

    def live(self) -> bool:
        """Whether an SDK set a tracer or meter provider (for good, once it has)."""
        if not self._live and not _providers_unset():
            with self._lock:
                if not self._live:
                    on = self.guard.on
                    on(AttemptStarted, self.attempt_started)
                    on(AttemptEnded, self.attempt_ended)
                    on(RetryScheduled, self.retry_scheduled)
                    on(CallEnded, self.call_ended)
                    if self.unprobe is not None:
                        self.unprobe()
                        self.unprobe = None
                    self._live = True
        return self._live

    def probe(self) -> CallEndCallback:
        """What hears a call's end while no provider is set, to notice one set after the
        Guard was made (then :meth:`live` hooks every event, and drops this probe).

        It reads the API's two globals itself: 280 instructions a call, where :meth:`live`
        takes 2,200 (the hook alone under valgrind, 2026-12-07). An API without them:
        live().
        """
        tracer_globals = trace
        meter_globals = _metrics_internal
        live = self.live
        known = hasattr(tracer_globals, "_TRACER_PROVIDER") and hasattr(
            meter_globals, "_METER_PROVIDER"
        )

        def probe(
            upstream: str,
            route: str | None,
            method: str,
            call_id: int,
            outcome: CallOutcome,
            attempts: int,
            duration: float,
            status: int | None,
            proxy_error: str | None,
        ) -> None:
            if (
                not known
                or tracer_globals._TRACER_PROVIDER is not None
                or meter_globals._METER_PROVIDER is not None
            ):
                live()

        return probe

    # --- a call and its attempts ---------------------------------------------------------

    def _open_call(self, upstream: str, route: str | None, method: str, call_id: int) -> _Call:
        attributes: dict[str, Any] = {
            "gateway_guard.upstream": upstream,
            "http.request.method": method,
            "gateway_guard.breaker.state": self.guard.breaker(upstream).state.value,
        }
        if route is not None:
            attributes["gateway_guard.route"] = route
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            # No server instrumentation made a span for the inbound request: continue the
            # trace its traceparent names, rather than start one of our own.
            ctx = current_context()
            if ctx is not None and ctx.traceparent is not None:
                parent = propagate.extract({"traceparent": ctx.traceparent})
        span = self.tracer.start_span(
            f"{method} {upstream}", context=parent, kind=SpanKind.INTERNAL, attributes=attributes
        )
        call = _Call(span)
        calls = self.calls
        if len(calls) >= _MAX_OPEN_CALLS:
            with self._lock:
                calls.pop(next(iter(calls)), None)
        calls[call_id] = call  # one dict store: atomic
        return call

    def attempt_started(self, event: AttemptStarted) -> None:
        call = self.calls.get(event.call_id)
        if call is None:
            if not self.live():
                return  # no SDK: every span would be a no-op (the events that follow too)
            call = self._open_call(event.upstream, event.route, event.method, event.call_id)
        attributes: dict[str, Any] = {
            "http.request.method": event.method,
            "gateway_guard.upstream": event.upstream,
            **_server(event.headers),
        }
        if event.attempt > 1:
            attributes["http.request.resend_count"] = event.attempt - 1
        parent = trace.set_span_in_context(call.span)
        span = self.tracer.start_span(
            event.method, context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        ctx = trace.set_span_in_context(span, parent)
        propagate.inject(event.headers, context=ctx)
        if _SUPPRESS_HTTP is not None:
            ctx = otel_context.set_value(_SUPPRESS_HTTP, True, ctx)
        call.attempt = span
        # Current while the attempt is sent (it ends on the same thread or task): HTTP
        # instrumentations see the suppression flag, and the client's own logs the span.
        call.token = otel_context.attach(ctx)

    def attempt_ended(self, event: AttemptEnded) -> None:
        call = self.calls.get(event.call_id)
        if call is None or call.attempt is None:
            return
        span, call.attempt = call.attempt, None
        token, call.token = call.token, None
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
        attributes: dict[str, Any] = {"http.request.method": event.method}
        if event.status is not None:
            span.set_attribute("http.response.status_code", event.status)
            attributes["http.response.status_code"] = event.status
        error_type = event.proxy_error
        if error_type is None and event.outcome == "failure" and event.status is not None:
            error_type = str(event.status)
        if event.outcome == "cancelled":
            error_type = "cancelled"
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            attributes["error.type"] = error_type
            if event.outcome != "cancelled":
                span.set_status(Status(StatusCode.ERROR, error_type))
        if event.proxy_error is not None:
            span.set_attribute("gateway_guard.proxy_error", event.proxy_error)
        span.end()
        self.duration.record(event.duration, attributes)

    def retry_scheduled(self, event: RetryScheduled) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            call.span.add_event(
                "gateway_guard.retry",
                {"gateway_guard.attempt": event.attempt, "gateway_guard.wait": event.wait},
            )

    def breaker_rejected(self, event: BreakerRejected) -> None:
        call = self.calls.get(event.call_id)
        if call is None:  # refused before its first attempt: the call's span is this
            if not self.live():
                return
            call = self._open_call(event.upstream, event.route, event.method, event.call_id)
        attributes: dict[str, Any] = {"gateway_guard.breaker.state": event.state}
        if event.retry_after is not None:
            attributes["gateway_guard.retry_after"] = event.retry_after
        call.span.add_event("gateway_guard.breaker_rejected", attributes)

    def call_ended(self, event: CallEnded) -> None:
        call = self.calls.pop(event.call_id, None)
        if call is None:
            return
        span = call.span
        span.set_attribute("gateway_guard.outcome", event.outcome)
        span.set_attribute("gateway_guard.attempts", event.attempts)
        if event.proxy_error is not None:
            span.set_attribute("gateway_guard.proxy_error", event.proxy_error)
        if event.status is not None:
            span.set_attribute("http.response.status_code", event.status)
        if event.outcome in ("failure", "rejected"):
            error_type = event.proxy_error or str(event.status or event.outcome)
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()

    # --- no call span: the current one ---------------------------------------------------

    def bulkhead_rejected(self, event: BulkheadRejected) -> None:
        if not self.live():
            return
        trace.get_current_span().add_event(
            "gateway_guard.bulkhead_rejected", {"gateway_guard.upstream": event.upstream}
        )

    def shed(self, event: InboundShed) -> None:
        if not self.live():
            return
        attributes: dict[str, Any] = {"gateway_guard.shed.reason": event.reason}
        if event.route is not None:
            attributes["gateway_guard.route"] = event.route
        if event.upstream is not None:
            attributes["gateway_guard.upstream"] = event.upstream
        trace.get_current_span().add_event("gateway_guard.shed", attributes)


# Guards already traced. Weak: the tracing object lives in the Guard's hooks, and dies with it.
_attached: weakref.WeakSet[Guard] = weakref.WeakSet()
_attach_lock = threading.Lock()


def attach(guard: Guard) -> None:
    """Trace ``guard``'s calls (what ``[tracing] enabled = true`` does). Idempotent."""
    with _attach_lock:
        if guard in _attached:
            return
        _attached.add(guard)
    tracing = _Tracing(guard)
    on = guard.on
    # Until an SDK sets a provider every span is a no-op: tracing then hears only a call's
    # end, as its fields (no event built), to notice the SDK (tracing.live), and the call
    # core builds none of the events nobody hears (-10,000 instructions a call each,
    # bench/observability.py --instructions). From then on every event; the first call
    # traced is the next one.
    on(BreakerRejected, tracing.breaker_rejected)
    on(BulkheadRejected, tracing.bulkhead_rejected)
    on(InboundShed, tracing.shed)
    if not tracing.live():  # the usual case, an SDK set up first, is traced from the start
        tracing.unprobe = guard.hooks._on_call_end(tracing.probe())
