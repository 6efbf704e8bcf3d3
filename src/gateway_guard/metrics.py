"""Prometheus metrics, built on the event hooks (the ``prometheus`` extra).

Imported only when metrics are on (``[metrics] enabled = true`` or ``path = "/metrics"``)
or when you import it: ``import gateway_guard`` never imports prometheus_client. Every
metric lives in prometheus_client's default registry, once per process, shared by every
Guard of the process; labels are upstream names, route names (their patterns unless
named), states and reasons, all bounded by the settings, never by what clients send.

Works in prometheus_client's multiprocess mode (gunicorn, ``PROMETHEUS_MULTIPROC_DIR``):
gauges carry a ``multiprocess_mode``, and :func:`exposition` collects every worker's
files when the variable is set. The breaker state is one 0/1 gauge per state (an Enum
does not work across processes): with several workers, ``livemax`` shows 1 for every
state some live worker's breaker is in.

Mount the endpoint in one line, if the middleware's ``[metrics] path`` does not suit::

    app.mount("/metrics", gateway_guard.metrics.make_asgi_app())      # Starlette/FastAPI
    wsgi = DispatcherMiddleware(app, {"/metrics": gateway_guard.metrics.make_wsgi_app()})
    app.add_url_rule("/metrics", view_func=gateway_guard.metrics.flask_view)    # Flask
    path("metrics", gateway_guard.django.metrics_view)                          # Django
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "gateway_guard's Prometheus metrics need prometheus_client: "
        "pip install 'gateway-guard[prometheus]'"
    ) from exc

from .breaker import BreakerState
from .events import (
    BreakerRejected,
    BreakerTransitioned,
    BudgetExhausted,
    BulkheadRejected,
    CallEnded,
    GatewayErrorAnswered,
    InboundAdmitted,
    InboundReleased,
    InboundShed,
    RetryScheduled,
)
from .inbound import Served

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["attach", "endpoint", "exposition", "flask_view", "make_asgi_app", "make_wsgi_app"]

_STATES = tuple(state.value for state in BreakerState)
# Seconds: from a fast cached answer to a call that used its whole deadline.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Metrics:
    """The metric families, created once per process (prometheus_client refuses twice)."""

    def __init__(self) -> None:
        self.calls = Counter(
            "gateway_guard_upstream_calls",
            "Guarded calls to an upstream, by outcome (success, failure, rejected, cancelled).",
            ["upstream", "outcome"],
        )
        self.failures = Counter(
            "gateway_guard_upstream_failures",
            "Failed calls by RFC 9209 proxy_error, or by the failure status the upstream "
            "answered (status; proxy_error empty).",
            ["upstream", "proxy_error", "status"],
        )
        self.attempts = Counter(
            "gateway_guard_upstream_attempts", "Attempts sent to an upstream.", ["upstream"]
        )
        self.retries = Counter(
            "gateway_guard_upstream_retries",
            "Retries scheduled after a failed attempt.",
            ["upstream"],
        )
        self.duration = Histogram(
            "gateway_guard_upstream_call_duration_seconds",
            "Duration of a guarded call, all attempts and waits included.",
            ["upstream", "outcome"],
            buckets=_BUCKETS,
        )
        self.rejections = Counter(
            "gateway_guard_upstream_rejections",
            "Calls refused before an attempt: breaker_open, breaker_half_open, "
            "breaker_forced_open, bulkhead_full.",
            ["upstream", "reason"],
        )
        self.budget_exhausted = Counter(
            "gateway_guard_retry_budget_exhausted",
            "Retries refused because the upstream's retry budget was spent.",
            ["upstream"],
        )
        self.budget = Gauge(
            "gateway_guard_retry_budget_remaining",
            "Retries the upstream's budget still allows over its window (summed over workers).",
            ["upstream"],
            multiprocess_mode="livesum",
        )
        self.state = Gauge(
            "gateway_guard_breaker_state",
            "1 for the breaker's current state, 0 for the others (with several workers: "
            "1 when any live worker's breaker is in it).",
            ["upstream", "state"],
            multiprocess_mode="livemax",
        )
        self.transitions = Counter(
            "gateway_guard_breaker_transitions",
            "Breaker state changes, by old and new state and reason.",
            ["upstream", "from_state", "to_state", "reason"],
        )
        self.in_flight = Gauge(
            "gateway_guard_bulkhead_in_flight",
            "Calls holding a bulkhead slot of the upstream, as of the last call's end "
            "(summed over workers).",
            ["upstream"],
            multiprocess_mode="livesum",
        )
        self.limit = Gauge(
            "gateway_guard_bulkhead_limit",
            "The bulkhead's max_concurrent (summed over workers; 0: no limit).",
            ["upstream"],
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "gateway_guard_inbound_shed",
            "Inbound requests refused before the app ran, by route and reason "
            "(capacity, queue_timeout, evicted, dependency_down).",
            ["route", "reason"],
        )
        self.inbound = Gauge(
            "gateway_guard_inbound_in_flight",
            "Inbound requests admitted and running the app (summed over workers).",
            ["route"],
            multiprocess_mode="livesum",
        )
        self.answered = Counter(
            "gateway_guard_gateway_errors",
            "Inbound requests answered (or aborted) with a gateway error.",
            ["route", "status", "proxy_error"],
        )


_lock = threading.Lock()
_metrics: _Metrics | None = None
# Guards whose live state (breaker states, budgets) is refreshed before each exposition.
_guards: weakref.WeakSet[Guard] = weakref.WeakSet()
# Each Guard's recorder. Weak values: the Guard's hooks hold the recorder (a cycle the
# garbage collector frees with the Guard); this map must not keep either alive.
_recorders: weakref.WeakValueDictionary[Guard, _Recorder] = weakref.WeakValueDictionary()


def _families() -> _Metrics:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


def _label(route: str | None) -> str:
    return route if route is not None else ""


class _Recorder:
    """One Guard's hooks into the metrics. The hot events (an attempt, a call's end) use
    label children looked up once per upstream, not ``labels()`` on every call."""

    def __init__(self, guard: Guard, metrics: _Metrics) -> None:
        self.guard = guard
        self.m = metrics
        self.attempts = {name: metrics.attempts.labels(name) for name in guard.upstreams}
        self.in_flight = {name: metrics.in_flight.labels(name) for name in guard.upstreams}
        self.bulkheads = {name: guard.bulkhead(name) for name in guard.upstreams}
        self.ok = {name: metrics.calls.labels(name, "success") for name in guard.upstreams}
        self.ok_duration = {
            name: metrics.duration.labels(name, "success") for name in guard.upstreams
        }

    def call_ended(self, event: CallEnded) -> None:
        # Everything from the call's end, one event a call: attempts sent, and the slots
        # held by the others (this call still holds its own until its driver returns).
        name = event.upstream
        if event.attempts:
            self.attempts[name].inc(event.attempts)
        self.in_flight[name].set(max(0, self.bulkheads[name].in_flight - 1))
        if event.outcome == "success":
            self.ok[name].inc()
            self.ok_duration[name].observe(event.duration)
            return
        m = self.m
        m.calls.labels(name, event.outcome).inc()
        m.duration.labels(name, event.outcome).observe(event.duration)
        if event.outcome == "failure":
            status = str(event.status) if event.proxy_error is None and event.status else ""
            m.failures.labels(name, event.proxy_error or "", status).inc()

    def retry_scheduled(self, event: RetryScheduled) -> None:
        self.m.retries.labels(event.upstream).inc()
        self._budget(event.upstream)

    def budget_exhausted(self, event: BudgetExhausted) -> None:
        self.m.budget_exhausted.labels(event.upstream).inc()
        self._budget(event.upstream)

    def breaker_rejected(self, event: BreakerRejected) -> None:
        self.m.rejections.labels(event.upstream, f"breaker_{event.state}").inc()

    def bulkhead_rejected(self, event: BulkheadRejected) -> None:
        self.m.rejections.labels(event.upstream, "bulkhead_full").inc()
        self.m.calls.labels(event.upstream, "rejected").inc()

    def transitioned(self, event: BreakerTransitioned) -> None:
        self.m.transitions.labels(event.upstream, event.old, event.new, event.reason).inc()
        self._state(event.upstream, event.new)

    def shed(self, event: InboundShed) -> None:
        self.m.shed.labels(_label(event.route), event.reason).inc()

    def admitted(self, event: InboundAdmitted) -> None:
        self.m.inbound.labels(_label(event.route)).inc()

    def released(self, event: InboundReleased) -> None:
        self.m.inbound.labels(_label(event.route)).dec()

    def answered(self, event: GatewayErrorAnswered) -> None:
        self.m.answered.labels(
            _label(event.route), str(event.status), event.proxy_error or ""
        ).inc()

    # --- live state ------------------------------------------------------------------------

    def _state(self, upstream: str, current: str) -> None:
        for state in _STATES:
            self.m.state.labels(upstream, state).set(1.0 if state == current else 0.0)

    def _budget(self, upstream: str) -> None:
        budget = self.guard.runtime(upstream).budget
        self.m.budget.labels(upstream).set(budget.remaining())

    def refresh(self) -> None:
        """The state read from the runtimes (half-open is entered lazily, budgets refill)."""
        for name in self.guard.upstreams:
            self._state(name, self.guard.breaker(name).state.value)
            self._budget(name)
            self.in_flight[name].set(self.bulkheads[name].in_flight)


def attach(guard: Guard) -> None:
    """Record ``guard``'s metrics (what ``[metrics] enabled = true`` does). Idempotent."""
    with _lock:
        if guard in _guards:
            return
        _guards.add(guard)
    metrics = _families()
    recorder = _Recorder(guard, metrics)
    _recorders[guard] = recorder
    for name in guard.upstreams:
        bulkhead = guard.bulkhead(name)
        metrics.limit.labels(name).set(0 if bulkhead.unlimited else bulkhead.max_concurrent)
        metrics.in_flight.labels(name)  # present (0) before the first call
        for outcome in ("success", "failure", "rejected"):
            metrics.calls.labels(name, outcome)
    recorder.refresh()
    on = guard.on
    on(CallEnded, recorder.call_ended)
    on(RetryScheduled, recorder.retry_scheduled)
    on(BudgetExhausted, recorder.budget_exhausted)
    on(BreakerRejected, recorder.breaker_rejected)
    on(BulkheadRejected, recorder.bulkhead_rejected)
    on(BreakerTransitioned, recorder.transitioned)
    on(InboundShed, recorder.shed)
    on(InboundAdmitted, recorder.admitted)
    on(InboundReleased, recorder.released)
    on(GatewayErrorAnswered, recorder.answered)


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's metrics (read from that
    directory); otherwise this process's default registry.
    """
    for recorder in list(_recorders.values()):
        recorder.refresh()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(prometheus_client.REGISTRY), CONTENT_TYPE_LATEST


# --- one-line mounts -----------------------------------------------------------------------


def endpoint(method: str) -> Served:
    """What the middleware answers on ``[metrics] path``: GET and HEAD, else 405."""
    if method not in ("GET", "HEAD"):
        return Served(405, [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")], b"")
    body, content_type = exposition()
    headers = [("Content-Type", content_type), ("Cache-Control", "no-store")]
    return Served(200, headers, b"" if method == "HEAD" else body)


_ASGIMessage = MutableMapping[str, Any]
_ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[_ASGIMessage]],
        Callable[[_ASGIMessage], Awaitable[None]],
    ],
    Awaitable[None],
]


def make_asgi_app() -> _ASGIApp:
    """An ASGI app answering every HTTP request with the metrics."""

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[_ASGIMessage]],
        send: Callable[[_ASGIMessage], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        body, content_type = exposition()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    return app


def make_wsgi_app() -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """A WSGI app answering every request with the metrics."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body, content_type = exposition()
        start_response(
            "200 OK",
            [("Content-Type", content_type), ("Cache-Control", "no-store")],
        )
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app


def flask_view() -> tuple[bytes, int, dict[str, str]]:
    """A Flask view: ``app.add_url_rule("/metrics", view_func=flask_view)``."""
    body, content_type = exposition()
    return body, 200, {"Content-Type": content_type, "Cache-Control": "no-store"}
