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

The common call, a success at its first attempt, only appends its duration to its
upstream's buffer (no lock, no prometheus_client call); the buffer is added to the
families in bulk when they are collected (any exposition of the default registry), when
it holds ``_BATCH`` durations, at exit, and in multiprocess mode by a daemon thread every
0.5 s, so another worker's scrape sees the call within a second. Every other outcome is
recorded at once.

Mount the endpoint in one line, if the middleware's ``[metrics] path`` does not suit::

    app.mount("/metrics", gateway_guard.metrics.make_asgi_app())      # Starlette/FastAPI
    wsgi = DispatcherMiddleware(app, {"/metrics": gateway_guard.metrics.make_wsgi_app()})
    app.add_url_rule("/metrics", view_func=gateway_guard.metrics.flask_view)    # Flask
    path("metrics", gateway_guard.django.metrics_view)                          # Django
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.metrics_core import Metric
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "gateway_guard's Prometheus metrics need prometheus_client: "
        "pip install 'gateway-guard[prometheus]'"
    ) from exc

from . import _fork
from .breaker import BreakerState
from .events import (
    BreakerRejected,
    BreakerTransitioned,
    BudgetExhausted,
    BulkheadRejected,
    CallOutcome,
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

logger = logging.getLogger("gateway_guard")

_STATES = tuple(state.value for state in BreakerState)
# Seconds: from a fast cached answer to a call that used its whole deadline.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The histogram's own bounds, +Inf last, as prometheus_client keeps them.
_UPPER_BOUNDS = (*_BUCKETS, math.inf)
# Durations an upstream's buffer holds before the call that fills it adds them to the
# families: bounded memory (~10 KiB an upstream), and the bulk add (a sort, a bisect a
# bucket, a few prometheus_client increments) costs ~480 instructions a call.
_BATCH = 256
# Multiprocess mode: buffered successes reach this worker's files within this many
# seconds (a daemon thread adds them), so any worker's scrape shows them within 1 s.
_FLUSH_SECONDS = 0.5


class _Metrics:
    """The metric families, created once per process (prometheus_client refuses twice).

    They are registered in the default registry as one collector (:class:`_Collector`),
    so that collecting them adds the buffered successes first, whoever collects.
    """

    def __init__(self) -> None:
        self.calls = Counter(
            "gateway_guard_upstream_calls",
            "Guarded calls to an upstream, by outcome (success, failure, rejected, cancelled).",
            ["upstream", "outcome"],
            registry=None,
        )
        self.failures = Counter(
            "gateway_guard_upstream_failures",
            "Failed calls by RFC 9209 proxy_error, or by the failure status the upstream "
            "answered (status; proxy_error empty).",
            ["upstream", "proxy_error", "status"],
            registry=None,
        )
        self.attempts = Counter(
            "gateway_guard_upstream_attempts",
            "Attempts sent to an upstream.",
            ["upstream"],
            registry=None,
        )
        self.retries = Counter(
            "gateway_guard_upstream_retries",
            "Retries scheduled after a failed attempt.",
            ["upstream"],
            registry=None,
        )
        self.duration = Histogram(
            "gateway_guard_upstream_call_duration_seconds",
            "Duration of a guarded call, all attempts and waits included.",
            ["upstream", "outcome"],
            buckets=_BUCKETS,
            registry=None,
        )
        self.rejections = Counter(
            "gateway_guard_upstream_rejections",
            "Calls refused before an attempt: breaker_open, breaker_half_open, "
            "breaker_forced_open, bulkhead_full.",
            ["upstream", "reason"],
            registry=None,
        )
        self.budget_exhausted = Counter(
            "gateway_guard_retry_budget_exhausted",
            "Retries refused because the upstream's retry budget was spent.",
            ["upstream"],
            registry=None,
        )
        self.budget = Gauge(
            "gateway_guard_retry_budget_remaining",
            "Retries the upstream's budget still allows over its window (summed over workers).",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.state = Gauge(
            "gateway_guard_breaker_state",
            "1 for the breaker's current state, 0 for the others (with several workers: "
            "1 when any live worker's breaker is in it).",
            ["upstream", "state"],
            multiprocess_mode="livemax",
            registry=None,
        )
        self.transitions = Counter(
            "gateway_guard_breaker_transitions",
            "Breaker state changes, by old and new state and reason.",
            ["upstream", "from_state", "to_state", "reason"],
            registry=None,
        )
        self.in_flight = Gauge(
            "gateway_guard_bulkhead_in_flight",
            "Calls holding a bulkhead slot of the upstream, as of the last call's end or "
            "scrape (summed over workers).",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.limit = Gauge(
            "gateway_guard_bulkhead_limit",
            "The bulkhead's max_concurrent (summed over workers; 0: no limit).",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.shed = Counter(
            "gateway_guard_inbound_shed",
            "Inbound requests refused before the app ran, by route and reason "
            "(capacity, queue_timeout, evicted, dependency_down).",
            ["route", "reason"],
            registry=None,
        )
        self.inbound = Gauge(
            "gateway_guard_inbound_in_flight",
            "Inbound requests admitted and running the app (summed over workers).",
            ["route"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.answered = Counter(
            "gateway_guard_gateway_errors",
            "Inbound requests answered (or aborted) with a gateway error.",
            ["route", "status", "proxy_error"],
            registry=None,
        )

    def all(self) -> tuple[MetricWrapperBase, ...]:
        """Every family, in the order they are exposed."""
        return (
            self.calls,
            self.failures,
            self.attempts,
            self.retries,
            self.duration,
            self.rejections,
            self.budget_exhausted,
            self.budget,
            self.state,
            self.transitions,
            self.in_flight,
            self.limit,
            self.shed,
            self.inbound,
            self.answered,
        )


class _Collector:
    """The families as one collector of the default registry: collecting them (our
    exposition, ``generate_latest()``, ``start_http_server()``...) first adds the
    buffered successes and reads the live state (:func:`_refresh`)."""

    def __init__(self, metrics: _Metrics) -> None:
        self.families = metrics.all()

    def describe(self) -> Iterator[Metric]:
        for family in self.families:
            yield from family.describe()

    def collect(self) -> Iterator[Metric]:
        _refresh()
        for family in self.families:
            yield from family.collect()


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
            prometheus_client.REGISTRY.register(_Collector(_metrics))
            atexit.register(_flush)
        return _metrics


def _label(route: str | None) -> str:
    return route if route is not None else ""


# --- the successes' buffers -------------------------------------------------------------------


class _Successes:
    """The durations of one upstream's calls that succeeded at their first attempt, not
    yet in the families. Shared by every Guard of the process with an upstream of that
    name (the families are), and never dropped with a Guard: what it holds is counted.

    Appending is one C call, atomic under real threads: no increment is lost. Only
    :meth:`flush` takes durations out, from the front, under ``_flush_lock``, so the ones
    appended meanwhile stay for the next flush.
    """

    __slots__ = ("attempts", "calls", "durations", "histogram", "in_bulk")

    def __init__(self, metrics: _Metrics, name: str) -> None:
        self.durations: list[float] = []
        self.calls = metrics.calls.labels(name, "success")
        self.attempts = metrics.attempts.labels(name)
        self.histogram = metrics.duration.labels(name, "success")
        # prometheus_client keeps a histogram as one value per bucket (not cumulative)
        # and its sum; adding to them in bulk is what observe() does one at a time.
        # Another layout (a future version): observe() each.
        self.in_bulk = (
            tuple(getattr(self.histogram, "_upper_bounds", ())) == _UPPER_BOUNDS
            and len(getattr(self.histogram, "_buckets", ())) == len(_UPPER_BOUNDS)
            and hasattr(getattr(self.histogram, "_sum", None), "inc")
        )

    def flush(self) -> bool:
        """Add the buffered durations to the families (``_flush_lock`` held)."""
        durations = self.durations
        count = len(durations)
        if not count:
            return False
        taken = durations[:count]
        del durations[:count]
        self.calls.inc(count)
        self.attempts.inc(count)
        histogram = self.histogram
        if not self.in_bulk:
            for duration in taken:
                histogram.observe(duration)
            return True
        taken.sort()
        buckets = histogram._buckets
        below = 0
        for bucket, bound in zip(buckets, _UPPER_BOUNDS, strict=True):
            upto = bisect_right(taken, bound)  # observe(): the first bucket with value <= bound
            if upto > below:
                bucket.inc(upto - below)
                if upto == count:
                    break
                below = upto
        histogram._sum.inc(sum(taken))
        return True


# Upstream name -> its buffer. Bounded by the upstream names of the process's Guards.
_buffers: dict[str, _Successes] = {}
# One flush at a time: what makes taking from the front of a buffer exact.
_flush_lock = threading.Lock()
_flusher: threading.Thread | None = None


def _flush() -> bool:
    """Add every buffer to the families; whether there was anything to add."""
    with _flush_lock:
        flushed = False
        for buffer in list(_buffers.values()):
            flushed = buffer.flush() or flushed
        return flushed


def _flush_one(buffer: _Successes) -> None:
    """A full buffer, from its call: unless a flush is under way (it takes this one too)."""
    if _flush_lock.acquire(blocking=False):
        try:
            buffer.flush()
        finally:
            _flush_lock.release()


def _flush_forever() -> None:
    """The multiprocess flusher: buffered successes reach this process's files within
    ``_FLUSH_SECONDS``, and so does the in-flight gauge of a busy upstream."""
    failed = False
    while True:
        time.sleep(_FLUSH_SECONDS)
        try:
            if _flush():
                for recorder in list(_recorders.values()):
                    recorder.set_in_flight()
        except Exception:  # a full disk, say: keep the buffers bounded, say so once
            if not failed:
                failed = True
                logger.exception("gateway_guard metrics: adding buffered calls failed")


def _start_flusher() -> None:
    with _lock:
        if _flusher is None or not _flusher.is_alive():
            _new_flusher()


def _new_flusher() -> None:
    global _flusher
    _flusher = threading.Thread(target=_flush_forever, name="gateway-guard-metrics", daemon=True)
    _flusher.start()


class _ForkHooks:
    """A forked child gets a fresh lock, and its own flusher if the parent had one. In
    multiprocess mode it starts with empty buffers: the parent adds what they held to
    its own files. (Otherwise the child's families are a copy of the parent's as of the
    fork, and the buffers are part of that state.)"""

    def _after_fork(self) -> None:
        global _flush_lock
        _flush_lock = threading.Lock()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            for buffer in _buffers.values():
                buffer.durations.clear()
        if _flusher is not None:
            _new_flusher()  # the child has no other thread: no lock to take


_fork_hooks = _ForkHooks()
_fork.register(_fork_hooks)
if hasattr(os, "register_at_fork"):
    # No fork in the middle of a flush: the child would inherit prometheus_client's
    # multiprocess lock held by a thread it does not have.
    def _before_fork() -> None:
        _flush_lock.acquire()

    def _after_fork_in_parent() -> None:
        _flush_lock.release()

    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)


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
        with _lock:
            for name in guard.upstreams:
                if name not in _buffers:
                    _buffers[name] = _Successes(metrics, name)
            self.buffers = {name: _buffers[name] for name in guard.upstreams}
        self.durations = {name: buffer.durations for name, buffer in self.buffers.items()}

    def call_end(
        self,
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
        """A call's end, from CallEnded's fields (``Hooks._on_call_end``: no event built)."""
        if attempts == 1 and outcome == "success":
            # The common call: one append, where a counter, a gauge, a counter and a
            # histogram took a lock each (-25,000 instructions a call: 739,200 -> 712,300
            # with the tracing probe's change, bench/observability.py --instructions,
            # 2026-12-07).
            durations = self.durations[upstream]
            durations.append(duration)
            if len(durations) >= _BATCH:
                _flush_one(self.buffers[upstream])
            return
        # Everything else at once: attempts sent, and the slots held by the others (this
        # call still holds its own until its driver returns).
        if attempts:
            self.attempts[upstream].inc(attempts)
        self.in_flight[upstream].set(max(0, self.bulkheads[upstream].in_flight - 1))
        if outcome == "success":
            self.ok[upstream].inc()
            self.ok_duration[upstream].observe(duration)
            return
        m = self.m
        m.calls.labels(upstream, outcome).inc()
        m.duration.labels(upstream, outcome).observe(duration)
        if outcome == "failure":
            failed = str(status) if proxy_error is None and status else ""
            m.failures.labels(upstream, proxy_error or "", failed).inc()

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

    def set_in_flight(self) -> None:
        for name, bulkhead in self.bulkheads.items():
            self.in_flight[name].set(bulkhead.in_flight)

    def refresh(self) -> None:
        """The state read from the runtimes (half-open is entered lazily, budgets refill)."""
        for name in self.guard.upstreams:
            self._state(name, self.guard.breaker(name).state.value)
            self._budget(name)
        self.set_in_flight()


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
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _start_flusher()
    on = guard.on
    guard.hooks._on_call_end(recorder.call_end)
    on(RetryScheduled, recorder.retry_scheduled)
    on(BudgetExhausted, recorder.budget_exhausted)
    on(BreakerRejected, recorder.breaker_rejected)
    on(BulkheadRejected, recorder.bulkhead_rejected)
    on(BreakerTransitioned, recorder.transitioned)
    on(InboundShed, recorder.shed)
    on(InboundAdmitted, recorder.admitted)
    on(InboundReleased, recorder.released)
    on(GatewayErrorAnswered, recorder.answered)


def _refresh() -> None:
    """Before an exposition: the buffered successes, and the state read from the runtimes."""
    _flush()
    for recorder in list(_recorders.values()):
        recorder.refresh()


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's metrics (read from that
    directory: this worker's as of now, the others' within a second);
    otherwise this process's default registry.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _refresh()
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
        # On a worker thread: in multiprocess mode a scrape reads every worker's files,
        # which must not hold the event loop (as the middleware's own /metrics).
        body, content_type = await anyio.to_thread.run_sync(exposition)
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
