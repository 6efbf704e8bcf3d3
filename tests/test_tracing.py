"""OpenTelemetry spans (gateway_guard.tracing), seen by the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import gateway_guard as gg
from gateway_guard.headers import parse_traceparent
from gateway_guard.retry import testing
from gateway_guard.testing import MisbehavingUpstream

EXPORTER = InMemorySpanExporter()
READER = InMemoryMetricReader()


def _install() -> None:
    """One SDK per process (OpenTelemetry refuses to replace a provider once set)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    if not isinstance(otel_metrics.get_meter_provider(), MeterProvider):
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


_install()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    EXPORTER.clear()
    with testing():
        yield


def traced(**upstream: Any) -> gg.Guard:
    return gg.Guard(
        {
            "tracing": {"enabled": True},
            "upstreams": {"up": {"base_url": "http://up.test:8080", **upstream}},
        }
    )


def spans() -> list[ReadableSpan]:
    return list(EXPORTER.get_finished_spans())


def test_import_gateway_guard_imports_no_opentelemetry() -> None:
    code = (
        "import sys, gateway_guard; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_call_span_and_a_child_per_attempt() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["traceparent"])
        return httpx.Response(503 if len(seen) < 3 else 200)

    guard = traced()
    with guard.client("up", transport=httpx.MockTransport(handler)) as client:
        assert client.get("/items").status_code == 200
    call, *others = sorted(spans(), key=lambda s: s.kind != SpanKind.INTERNAL)
    attempts = sorted(others, key=lambda s: s.start_time or 0)
    assert call.name == "GET up" and call.kind == SpanKind.INTERNAL
    assert call.attributes is not None
    assert call.attributes["gateway_guard.upstream"] == "up"
    assert call.attributes["gateway_guard.breaker.state"] == "closed"
    assert call.attributes["gateway_guard.attempts"] == 3
    assert call.attributes["gateway_guard.outcome"] == "success"
    assert [e.name for e in call.events] == ["gateway_guard.retry", "gateway_guard.retry"]
    assert len(attempts) == 3
    for n, attempt in enumerate(attempts):
        assert attempt.name == "GET" and attempt.kind == SpanKind.CLIENT
        assert attempt.parent is not None and attempt.parent.span_id == call.context.span_id
        assert attempt.context.trace_id == call.context.trace_id
        attrs = attempt.attributes or {}
        assert attrs.get("http.request.resend_count") == (n or None)
        assert (attrs["server.address"], attrs["server.port"]) == ("up.test", 8080)
        # The upstream got this attempt's own context.
        parsed = parse_traceparent(seen[n])
        assert parsed is not None
        assert parsed[1] == format(attempt.context.span_id, "016x")
    assert [(a.attributes or {}).get("http.response.status_code") for a in attempts] == [
        503,
        503,
        200,
    ]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert (attempts[0].attributes or {})["error.type"] == "503"
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


def test_a_failed_call_and_a_breaker_rejection() -> None:
    guard = traced(breaker={"min_calls": 1, "window_size": 1}, retry={"attempts": 1})
    with guard.client("up", transport=httpx.MockTransport(lambda r: httpx.Response(500))) as c:
        with pytest.raises(gg.UpstreamStatusError):
            c.get("/")
        with pytest.raises(gg.CircuitOpenError):
            c.get("/")
    finished = spans()
    calls = [s for s in finished if s.kind == SpanKind.INTERNAL]
    assert len(calls) == 2 and len(finished) == 3  # the rejected call sent no attempt
    failed, rejected = sorted(calls, key=lambda s: s.start_time or 0)
    assert failed.status.status_code == StatusCode.ERROR
    assert (rejected.attributes or {})["gateway_guard.outcome"] == "rejected"
    assert (rejected.attributes or {})["error.type"] == "destination_unavailable"
    assert [e.name for e in rejected.events] == ["gateway_guard.breaker_rejected"]


def test_the_duration_metric_through_the_api_meter() -> None:
    guard = traced()
    with guard.client("up", transport=httpx.MockTransport(lambda r: httpx.Response(200))) as c:
        c.get("/")
    data = READER.get_metrics_data()
    assert data is not None
    names = {
        metric.name
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert "http.client.request.duration" in names


def test_no_spans_when_tracing_is_off() -> None:
    guard = gg.Guard({"upstreams": {"up": {"base_url": "http://up.test"}}})
    with guard.client("up", transport=httpx.MockTransport(lambda r: httpx.Response(200))) as c:
        c.get("/")
    assert spans() == []


def test_no_second_span_from_the_httpx_instrumentation() -> None:
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument()
    try:
        with MisbehavingUpstream() as upstream:
            upstream.set_mode("status", status=503)
            guard = gg.Guard(
                {"tracing": {"enabled": True}, "upstreams": {"up": {"base_url": upstream.url}}}
            )
            with guard.client("up") as client, pytest.raises(gg.UpstreamStatusError):
                client.get("/")
            # Unguarded, the instrumentation still makes its span: it is on.
            with httpx.Client() as bare:
                bare.get(upstream.url)
    finally:
        instrumentor.uninstrument()
    finished = spans()
    ours = [
        s
        for s in finished
        if s.instrumentation_scope and s.instrumentation_scope.name == "gateway_guard"
    ]
    theirs = [s for s in finished if s not in ours]
    assert len(ours) == 4  # the call and its three attempts
    assert len(theirs) == 1  # the unguarded request only


SDK_LATER = """
import httpx
import gateway_guard as gg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

guard = gg.Guard({"tracing": {"enabled": True}, "upstreams": {"up": {"base_url": "http://u"}}})
client = guard.client("up", transport=httpx.MockTransport(lambda r: httpx.Response(200)))
client.get("/")  # no SDK yet: nothing to trace
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
client.get("/")  # notices the SDK at its end
client.get("/")  # traced
print(len(exporter.get_finished_spans()))
"""


def test_an_sdk_set_after_the_guard_is_noticed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SDK_LATER], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "2"  # the third call: its span and its attempt's


METER_LATER = """
import httpx
import gateway_guard as gg
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

guard = gg.Guard({"tracing": {"enabled": True}, "upstreams": {"up": {"base_url": "http://u"}}})
client = guard.client("up", transport=httpx.MockTransport(lambda r: httpx.Response(200)))
client.get("/")  # no SDK yet: nothing to record
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
client.get("/")  # notices the meter provider at its end
client.get("/")  # its attempt's duration is recorded
data = reader.get_metrics_data()
print(sum(
    point.count
    for resource in data.resource_metrics
    for scope in resource.scope_metrics
    for metric in scope.metrics
    if metric.name == "http.client.request.duration"
    for point in metric.data.data_points
))
"""


def test_a_meter_provider_set_after_the_guard_is_noticed() -> None:
    """A meter provider alone (no tracer provider) set after the Guard was made."""
    out = subprocess.run(
        [sys.executable, "-c", METER_LATER], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "1"  # the third call's one attempt
