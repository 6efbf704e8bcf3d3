"""Zero-code instrumentation: gg.instrument / gg.uninstrument, and the httpx seam.

Unit tests script the upstream with httpx.MockTransport (the SDK-like client's own
transport); tests/test_e2e_instrument.py runs real servers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard._instrument import apply_settings, instrumented

SETTINGS = {
    "service": "shop",
    "defaults": {"retry": {"attempts": 3, "backoff_initial": 0.0, "jitter": False}},
    "upstreams": {
        "payments": {"base_url": "http://payments.internal:8080", "match": ["*.pay.test"]},
        "other": {"base_url": "http://other.internal"},
    },
}


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    gg.uninstrument()
    yield
    gg.uninstrument()


class Upstream:
    """A MockTransport handler that answers ``status`` and counts what it saw."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(self.status, text="hello")


class SDK:
    """What a third-party SDK does: build its own httpx.Client, its own transport."""

    def __init__(self, base_url: str, handler: Upstream) -> None:
        self.http = httpx.Client(base_url=base_url, transport=httpx.MockTransport(handler))

    def charge(self, method: str = "GET", **kwargs: Any) -> httpx.Response:
        return self.http.request(method, "/charges", **kwargs)


def test_uninstrument_restores_exactly_and_instrument_is_idempotent() -> None:
    before = (
        httpx.Client.__dict__["_transport_for_url"],
        httpx.AsyncClient.__dict__["_transport_for_url"],
    )
    guard = gg.Guard(SETTINGS)
    gg.instrument(guard, clients=("httpx",))
    patched = httpx.Client.__dict__["_transport_for_url"]
    assert patched is not before[0]
    gg.instrument(guard, clients=["httpx"])
    assert httpx.Client.__dict__["_transport_for_url"] is patched
    assert instrumented() == (guard, ("httpx",))
    gg.uninstrument()
    gg.uninstrument()
    after = (
        httpx.Client.__dict__["_transport_for_url"],
        httpx.AsyncClient.__dict__["_transport_for_url"],
    )
    assert after == before
    assert instrumented() == (None, ())


def test_unknown_client_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown client 'urllib' to instrument"):
        gg.instrument(gg.Guard(SETTINGS), clients=("urllib",))


def test_a_call_to_an_upstream_host_is_guarded() -> None:
    guard = gg.Guard(SETTINGS)
    handler = Upstream(503)
    sdk = SDK("http://payments.internal:8080", handler)
    assert sdk.charge().status_code == 503  # not instrumented: the SDK's own answer
    assert len(handler.seen) == 1
    handler.seen.clear()
    gg.instrument(guard, clients=("httpx",))
    with pytest.raises(gg.UpstreamStatusError) as info:
        sdk.charge()
    assert info.value.upstream == "payments"
    assert len(handler.seen) == 3  # retried by the payments policy


def test_a_post_without_idempotency_key_is_sent_once() -> None:
    gg.instrument(gg.Guard(SETTINGS), clients=("httpx",))
    handler = Upstream(503)
    with pytest.raises(gg.UpstreamStatusError):
        SDK("http://payments.internal:8080", handler).charge("POST", json={"amount": 1})
    assert len(handler.seen) == 1


def test_match_patterns_and_other_hosts() -> None:
    gg.instrument(gg.Guard(SETTINGS), clients=("httpx",))
    handler = Upstream(503)
    with pytest.raises(gg.UpstreamStatusError):
        SDK("https://eu.pay.test", handler).charge()
    handler.seen.clear()
    # Another host, and the upstream's host on another port: untouched.
    assert SDK("https://example.com", handler).charge().status_code == 503
    assert SDK("http://payments.internal:9999", handler).charge().status_code == 503
    assert len(handler.seen) == 2


def test_one_client_alternating_between_hosts_gets_each_hosts_guard() -> None:
    # The wrapper remembers the last decision per transport: a client that alternates
    # between two upstreams, another port and another host must never reuse it wrongly.
    guard = gg.Guard(SETTINGS)
    gg.instrument(guard, clients=("httpx",))
    handler = Upstream(200)
    urls = [
        ("http://payments.internal:8080/x", "payments"),
        ("http://other.internal/x", "other"),
        ("http://payments.internal:9999/x", None),  # the upstream's host, another port
        ("https://eu.pay.test/x", "payments"),
        ("https://payments.internal/x", None),  # another scheme: its default port, 443
        ("http://payments.internal:8080/x", "payments"),
    ]
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        for _ in range(3):
            for url, _upstream in urls:
                assert client.get(url).status_code == 200
    calls = {name: guard.breaker(name).snapshot().calls for name in ("payments", "other")}
    assert calls == {"payments": 9, "other": 3}
    assert len(handler.seen) == 18


def test_a_clients_remembered_decision_follows_its_transport_and_the_instrumented_guard() -> None:
    # The wrapper keeps the client's last decision on the client: a transport swapped in
    # later, or another Guard instrumented since, must not get the earlier decision.
    first, second = gg.Guard(SETTINGS), gg.Guard(SETTINGS)
    gg.instrument(first, clients=("httpx",))
    before, after = Upstream(200), Upstream(503)
    with httpx.Client(transport=httpx.MockTransport(before)) as client:
        url = "http://payments.internal:8080/x"
        assert client.get(url).status_code == 200
        assert client.get(url).status_code == 200
        client._transport = httpx.MockTransport(after)
        with pytest.raises(gg.UpstreamStatusError):
            client.get(url)
        assert (len(before.seen), len(after.seen)) == (2, 3)  # the new one, guarded
        gg.instrument(second, clients=("httpx",))
        with pytest.raises(gg.UpstreamStatusError):
            client.get(url)
    assert first.breaker("payments").snapshot().calls == 3
    assert second.breaker("payments").snapshot().calls == 1


class Forwarding(httpx.Client):
    """An SDK's client that answers any missing attribute (as some wrappers do), here with
    something that cannot be indexed."""

    def __getattr__(self, name: str) -> Any:
        return 42


def test_a_client_class_answering_every_attribute_is_still_guarded() -> None:
    guard = gg.Guard(SETTINGS)
    gg.instrument(guard, clients=("httpx",))
    handler = Upstream(200)
    with Forwarding(transport=httpx.MockTransport(handler)) as client:
        for _ in range(3):
            assert client.get("http://payments.internal:8080/x").status_code == 200
            assert client.get("http://example.com/x").status_code == 200
    assert guard.breaker("payments").snapshot().calls == 3
    assert len(handler.seen) == 6


def test_threads_sharing_one_client_between_upstreams_each_get_the_right_guard() -> None:
    # One client, several threads, each calling its own host: whatever order the client's
    # remembered decision is written and read in, every call goes to its own upstream.
    guard = gg.Guard(SETTINGS)
    ended: list[str] = []  # list.append: safe from any thread
    guard.on(gg.events.CallEnded, lambda event: ended.append(event.upstream))
    gg.instrument(guard, clients=("httpx",))
    handler = Upstream(200)
    urls = [
        "http://payments.internal:8080/x",
        "http://other.internal/x",
        "http://payments.internal:9999/x",  # not an upstream: the same host, another port
        "http://example.com/x",
    ]
    calls = 200
    barrier = threading.Barrier(len(urls))

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:

        def run(url: str) -> None:
            barrier.wait()
            for _ in range(calls):
                assert client.get(url).status_code == 200

        threads = [threading.Thread(target=run, args=(url,)) for url in urls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
    assert sorted(ended) == ["other"] * calls + ["payments"] * calls
    assert len(handler.seen) == len(urls) * calls


def test_an_explicitly_guarded_client_is_not_guarded_twice() -> None:
    guard = gg.Guard(SETTINGS)
    gg.instrument(guard, clients=("httpx",))
    handler = Upstream(503)
    client = guard.client("payments", transport=httpx.MockTransport(handler))
    with client, pytest.raises(gg.UpstreamStatusError):
        client.get("/charges")
    assert len(handler.seen) == 3  # not 9


def test_a_clients_mounts_still_choose_the_transport() -> None:
    # The wrapper does httpx's transport lookup inline only for a client without mounts.
    gg.instrument(gg.Guard(SETTINGS), clients=("httpx",))
    default, mounted = Upstream(200), Upstream(503)
    client = httpx.Client(
        transport=httpx.MockTransport(default),
        mounts={"http://payments.internal:8080": httpx.MockTransport(mounted)},
    )
    with client:
        with pytest.raises(gg.UpstreamStatusError):
            client.get("http://payments.internal:8080/charges")
        assert (len(default.seen), len(mounted.seen)) == (0, 3)  # the mount's, guarded
        assert client.get("http://example.com/").status_code == 200
    assert len(default.seen) == 1


def test_a_transport_lookup_patched_before_us_is_still_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Someone else's wrapper of the seam (installed first) keeps running under ours.
    original = httpx.Client._transport_for_url
    seen: list[str] = []

    def theirs(self: httpx.Client, url: httpx.URL) -> httpx.BaseTransport:
        seen.append(str(url))
        return original(self, url)

    monkeypatch.setattr(httpx.Client, "_transport_for_url", theirs)
    gg.instrument(gg.Guard(SETTINGS), clients=("httpx",))
    handler = Upstream(503)
    with pytest.raises(gg.UpstreamStatusError):
        SDK("http://payments.internal:8080", handler).charge()
    assert len(handler.seen) == 3
    assert seen == ["http://payments.internal:8080/charges"]  # once: retries are inside
    gg.uninstrument()
    assert httpx.Client._transport_for_url is theirs


def test_async_clients_are_guarded() -> None:
    gg.instrument(gg.Guard(SETTINGS), clients=("httpx",))
    handler = Upstream(503)

    async def main() -> None:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(gg.UpstreamStatusError):
                await client.get("http://payments.internal:8080/charges")
            assert (await client.get("http://example.com/")).status_code == 503

    asyncio.run(main())
    assert len(handler.seen) == 4


def test_the_last_guard_instrumented_wins() -> None:
    first, second = gg.Guard(SETTINGS), gg.Guard(SETTINGS)
    gg.instrument(first, clients=("httpx",))
    gg.instrument(second, clients=("httpx",))
    with pytest.raises(gg.UpstreamStatusError):
        SDK("http://payments.internal:8080", Upstream(503)).charge()
    assert second.breaker("payments").snapshot().calls == 1
    assert first.breaker("payments").snapshot().calls == 0


def test_the_setting_applies_when_a_middleware_is_created() -> None:
    guard = gg.Guard({**SETTINGS, "instrument": ["httpx"]})
    assert instrumented() == (None, ())
    gg.GatewayGuardWSGI(lambda environ, start_response: [], guard=guard)
    assert instrumented() == (guard, ("httpx",))
    gg.uninstrument()
    apply_settings(gg.Guard(SETTINGS))  # instrument = [] (the default): nothing patched
    assert instrumented() == (None, ())


def test_the_setting_is_validated() -> None:
    with pytest.raises(gg.SettingsError, match="instrument.0"):
        gg.Guard({"instrument": ["urllib"]})


# --- OpenTelemetry and Sentry, in either order ----------------------------------------------


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


STACKED = """
import json, threading, httpx, gateway_guard as gg
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

hits = []
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        hits.append((self.headers.get("traceparent"), self.headers.get("sentry-trace")))
        self.send_response(503); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
server = ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]
guard = gg.Guard({{"defaults": {{"retry": {{"attempts": 3, "backoff_initial": 0.0}}}},
                  "upstreams": {{"up": {{"base_url": f"http://127.0.0.1:{{port}}"}}}}}})

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))

import sentry_sdk
from sentry_sdk.integrations.httpx import HttpxIntegration
events = []

def otel(): HTTPXClientInstrumentor().instrument(tracer_provider=provider)
def sentry():
    sentry_sdk.init(dsn="https://key@sentry.invalid/1", integrations=[HttpxIntegration()],
                    default_integrations=False, traces_sample_rate=1.0,
                    transport=lambda envelope: events.append(envelope))
def ours(): gg.instrument(guard, clients=("httpx",))

for step in {order}:
    globals()[step]()

def call():
    with httpx.Client() as client:
        try:
            client.get(f"http://127.0.0.1:{{port}}/x")
        except gg.UpstreamStatusError as exc:
            return exc.attempts
    return None

with sentry_sdk.start_span(name="t"):
    attempts = call()
# Another host: passes untouched (the bare 503 comes back, not an exception).
other = httpx.get(f"http://localhost:{{port}}/y").status_code
spans = [s.name for s in exporter.get_finished_spans()]
print(json.dumps({{"attempts": attempts, "hits": len(hits), "other": other,
                  "spans": len(spans), "traceparents": sum(1 for t, _ in hits if t),
                  "sentry": sum(1 for _, s in hits if s)}}))
gg.uninstrument()
HTTPXClientInstrumentor().uninstrument()
server.shutdown()
"""


@pytest.mark.parametrize(
    "order",
    [
        ["otel", "sentry", "ours"],
        ["ours", "otel", "sentry"],
        ["sentry", "ours", "otel"],
    ],
)
def test_works_with_opentelemetry_and_sentry_in_any_order(order: list[str]) -> None:
    import json

    # The subprocess imports opentelemetry-instrumentation-httpx and sentry-sdk (dev
    # dependencies): missing, it fails, never skips.
    result = json.loads(_run(textwrap.dedent(STACKED.format(order=order))).splitlines()[-1])
    # Guarded once: three attempts reached the server, then the status error.
    assert result["attempts"] == 3
    assert result["hits"] == 4  # 3 guarded attempts + 1 call to the other host
    assert result["other"] == 503
    # OpenTelemetry saw the calls (a span per attempt, or per guarded call when it was
    # installed after us) and propagated its trace to each request that reached the server.
    assert result["spans"] >= 2
    assert result["traceparents"] == 4
    # Sentry's integration ran too: it put its trace header on the guarded call's requests.
    assert result["sentry"] >= 3


def test_the_setting_applies_when_django_loads_the_middleware() -> None:
    from django.http import HttpRequest, HttpResponse
    from django.test import override_settings

    import django_setup  # noqa: F401 - configures Django once for the process
    from gateway_guard.django import GatewayGuardMiddleware, get_guard

    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    with override_settings(GATEWAY_GUARD={**SETTINGS, "instrument": ["httpx"]}):
        GatewayGuardMiddleware(view)
        assert instrumented() == (get_guard(), ("httpx",))
