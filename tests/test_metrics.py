"""Prometheus metrics (gateway_guard.metrics): what the hooks record, and every way to
serve them. Metrics live in prometheus_client's default registry, shared by the whole
process, so each test uses upstream and route names of its own."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import RequestFactory
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import gateway_guard as gg
import gateway_guard.django
import gateway_guard.metrics as gm
import test_django  # noqa: F401 - configures Django once per process
from gateway_guard.retry import testing

_names = itertools.count()


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    with testing():
        yield


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def samples(
    text: str | bytes | None = None,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by (name, sorted labels)."""
    if text is None:
        text = gm.exposition()[0]
    if isinstance(text, bytes):
        text = text.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metered(name: str, upstream: dict[str, Any] | None = None, **settings: Any) -> gg.Guard:
    return gg.Guard(
        {
            "metrics": {"enabled": True},
            "upstreams": {name: {"base_url": "http://up.test", **(upstream or {})}},
            **settings,
        }
    )


def scripted(*statuses: int) -> httpx.MockTransport:
    answers = list(statuses)
    return httpx.MockTransport(lambda request: httpx.Response(answers.pop(0)))


def test_import_gateway_guard_imports_no_prometheus_client() -> None:
    code = "import sys, gateway_guard; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_calls_attempts_retries_and_durations() -> None:
    up = unique("calls")
    guard = metered(up)
    with guard.client(up, transport=scripted(503, 200, 503, 503, 503)) as client:
        assert client.get("/a").status_code == 200
        with pytest.raises(gg.UpstreamStatusError):
            client.get("/b")
    s = samples()
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="success") == 1
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="failure") == 1
    assert value(s, "gateway_guard_upstream_attempts_total", upstream=up) == 5
    assert value(s, "gateway_guard_upstream_retries_total", upstream=up) == 3
    assert (
        value(s, "gateway_guard_upstream_failures_total", upstream=up, proxy_error="", status="503")
        == 1
    )
    assert (
        value(
            s, "gateway_guard_upstream_call_duration_seconds_count", upstream=up, outcome="success"
        )
        == 1
    )
    assert value(s, "gateway_guard_bulkhead_in_flight", upstream=up) == 0
    assert value(s, "gateway_guard_bulkhead_limit", upstream=up) == 100
    assert value(s, "gateway_guard_retry_budget_remaining", upstream=up) > 0


def test_transport_errors_by_proxy_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    up = unique("refused")
    guard = metered(up, upstream={"retry": {"attempts": 1}})
    with (
        guard.client(up, transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(gg.UpstreamConnectError) as info,
    ):
        client.get("/")
    s = samples()
    labels = {"upstream": up, "proxy_error": info.value.proxy_error or "", "status": ""}
    assert value(s, "gateway_guard_upstream_failures_total", **labels) == 1


def test_breaker_state_transitions_and_rejections() -> None:
    up = unique("breaker")
    guard = metered(
        up, upstream={"breaker": {"min_calls": 2, "window_size": 2}, "retry": {"attempts": 1}}
    )
    s = samples()
    assert value(s, "gateway_guard_breaker_state", upstream=up, state="closed") == 1
    with guard.client(up, transport=scripted(500, 500)) as client:
        for _ in range(2):
            with pytest.raises(gg.UpstreamStatusError):
                client.get("/")
        with pytest.raises(gg.CircuitOpenError):
            client.get("/")
    s = samples()
    for state in ("closed", "open", "half_open", "forced_open", "disabled"):
        expected = 1.0 if state == "open" else 0.0
        assert value(s, "gateway_guard_breaker_state", upstream=up, state=state) == expected
    transition = {"upstream": up, "from_state": "closed", "to_state": "open"}
    assert (
        value(s, "gateway_guard_breaker_transitions_total", **transition, reason="failure_rate")
        == 1
    )
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="rejected") == 1
    assert (
        value(s, "gateway_guard_upstream_rejections_total", upstream=up, reason="breaker_open") == 1
    )


def test_inbound_in_flight_shed_and_gateway_errors() -> None:
    up, route = unique("inbound"), unique("/inbound")
    guard = metered(
        up,
        routes=[{"path": route, "shed": {"max_concurrent": 1, "max_queue": 0}}],
    )
    inside: list[dict[Any, float]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == route and not inside:
            inside.append(samples())
            # A second request while this one holds the route's only slot: shed.
            transport = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as nested:
                assert (await nested.get(route)).status_code == 503
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = gg.GatewayGuardMiddleware(app, guard=guard)

    async def main() -> None:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get(route)).status_code == 200

    asyncio.run(main())
    assert value(inside[0], "gateway_guard_inbound_in_flight", route=route) == 1
    s = samples()
    assert value(s, "gateway_guard_inbound_in_flight", route=route) == 0
    assert value(s, "gateway_guard_inbound_shed_total", route=route, reason="capacity") == 1
    labels = {"route": route, "status": "503", "proxy_error": "connection_limit_reached"}
    assert value(s, "gateway_guard_gateway_errors_total", **labels) == 1


# --- serving them -------------------------------------------------------------------------------


def served_guard() -> tuple[gg.Guard, str]:
    up = unique("served")
    guard = gg.Guard({"metrics": {"path": "/metrics"}, "upstreams": {up: {}}})
    return guard, up


def test_the_asgi_middleware_serves_the_path() -> None:
    guard, up = served_guard()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app never sees /metrics")

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=gg.GatewayGuardMiddleware(app, guard=guard))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get("/metrics"), await client.post("/metrics")]

    get, post = asyncio.run(main())
    assert get.status_code == 200 and get.headers["content-type"].startswith("text/plain")
    assert value(samples(get.text), "gateway_guard_breaker_state", upstream=up, state="closed") == 1
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")


def test_the_wsgi_middleware_serves_the_path() -> None:
    guard, up = served_guard()

    def app(environ: Any, start_response: Any) -> list[bytes]:
        raise AssertionError("the app never sees /metrics")

    transport = httpx.WSGITransport(app=gg.GatewayGuardWSGI(app, guard=guard))
    with httpx.Client(transport=transport, base_url="http://t") as client:
        response = client.get("/metrics")
        head = client.head("/metrics")
    assert response.status_code == 200
    assert (
        value(samples(response.text), "gateway_guard_breaker_state", upstream=up, state="closed")
        == 1
    )
    assert head.status_code == 200 and head.content == b""


def test_the_django_middleware_and_view_serve_them() -> None:
    from django.test import override_settings

    from gateway_guard.django.conf import get_guard  # noqa: F401 - the process's Guard

    up = unique("django")
    settings = {"metrics": {"path": "/metrics"}, "upstreams": {up: {}}}
    with override_settings(GATEWAY_GUARD=settings):
        middleware = gateway_guard.django.GatewayGuardMiddleware(
            lambda request: pytest.fail("the view never sees /metrics")
        )
        response = middleware(RequestFactory().get("/metrics"))
        assert response.status_code == 200  # type: ignore[union-attr]
        text = response.content.decode()  # type: ignore[union-attr]
        assert value(samples(text), "gateway_guard_breaker_state", upstream=up, state="closed") == 1
    view = gateway_guard.django.metrics_view(RequestFactory().get("/anywhere"))
    assert view.status_code == 200 and b"gateway_guard_breaker_state" in view.content


def test_the_mounts() -> None:
    guard, up = served_guard()
    flask_app = Flask(__name__)
    flask_app.add_url_rule("/m", view_func=gm.flask_view)
    response = flask_app.test_client().get("/m")
    assert response.status_code == 200 and b"gateway_guard_breaker_state" in response.data

    transport = httpx.WSGITransport(app=gm.make_wsgi_app())
    with httpx.Client(transport=transport, base_url="http://t") as client:
        assert b"gateway_guard_breaker_state" in client.get("/").content

    async def main() -> bytes:
        asgi = httpx.ASGITransport(app=gm.make_asgi_app())
        async with httpx.AsyncClient(transport=asgi, base_url="http://t") as client:
            return (await client.get("/")).content

    assert b"gateway_guard_breaker_state" in asyncio.run(main())
    assert guard.upstreams == (up,)


def test_attach_is_idempotent() -> None:
    up = unique("twice")
    guard = metered(up)
    gm.attach(guard)  # already attached by the settings: nothing more
    with guard.client(up, transport=scripted(200)) as client:
        client.get("/")
    assert value(samples(), "gateway_guard_upstream_attempts_total", upstream=up) == 1


def test_the_flask_extension_serves_the_path() -> None:
    from gateway_guard.flask import GatewayGuard

    up = unique("flask")
    app = Flask(__name__)
    app.config["GATEWAY_GUARD"] = {"metrics": {"path": "/metrics"}, "upstreams": {up: {}}}
    GatewayGuard(app)

    @app.get("/metrics")
    def shadowed() -> str:
        raise AssertionError("the middleware answers first")

    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert value(samples(text), "gateway_guard_breaker_state", upstream=up, state="closed") == 1


# --- the buffered successes (#14) ---------------------------------------------------------------


@pytest.mark.implementation
def test_exact_counts_from_8_threads_of_10k_calls_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 real threads end 10,000 calls each through the hub the call core uses, while a
    ninth scrapes: no call is lost or counted twice (appends are atomic, a flush takes
    only what it counted)."""
    # Small buffers: the threads flush them too, racing each other's appends (a flush
    # that cleared what it had not counted lost 8-27% of the calls here).
    monkeypatch.setattr(gm, "_BATCH", 8)
    up = unique("threads")
    guard = metered(up)
    ended = guard.hooks.call_ended
    assert ended is not None
    threads, calls = 8, 10_000
    # Binary fractions: their sum is exact in any order, so the sum is checked exactly.
    durations = [k / 64 for k in range(8)]  # 0 .. 0.109375 s, over several buckets
    stop = threading.Event()

    start = threading.Barrier(threads + 1)

    def end_calls(worker: int) -> None:
        start.wait()
        for i in range(calls):
            if i % 100 == 99:  # 1%: a success after a retry, recorded at once
                ended(up, None, "GET", worker, "success", 2, 0.5, 200, None)
            elif i % 100 == 98:  # 1%: a failure
                ended(up, None, "GET", worker, "failure", 1, 0.25, None, "connection_refused")
            else:
                ended(up, None, "GET", worker, "success", 1, durations[i % 8], 200, None)

    def scrape() -> None:
        start.wait()
        while not stop.is_set():
            gm.exposition()
            for _ in range(50):  # and flushes between: more flushes for appends to race
                gm._flush()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as CPython will
    try:
        scraper = threading.Thread(target=scrape)
        scraper.start()
        workers = [threading.Thread(target=end_calls, args=(n,)) for n in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        stop.set()
        scraper.join()
    finally:
        sys.setswitchinterval(interval)
    s = samples()
    first = [i for i in range(calls) if i % 100 < 98]
    ok, retried, failed = len(first) * threads, calls // 100 * threads, calls // 100 * threads
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="success") == (
        ok + retried
    )
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="failure") == failed
    assert value(s, "gateway_guard_upstream_attempts_total", upstream=up) == (
        ok + 2 * retried + failed
    )
    success = {"upstream": up, "outcome": "success"}
    name = "gateway_guard_upstream_call_duration_seconds"
    assert value(s, f"{name}_count", **success) == ok + retried
    assert value(s, f"{name}_sum", **success) == (
        sum(durations[i % 8] for i in first) * threads + 0.5 * retried
    )
    expected_le_0_05 = sum(durations[i % 8] <= 0.05 for i in first) * threads
    assert value(s, f"{name}_bucket", **success, le="0.05") == expected_le_0_05
    assert value(s, f"{name}_bucket", **success, le="+Inf") == ok + retried


def test_exact_counts_from_8_threads_of_real_calls() -> None:
    up = unique("threaded_calls")
    guard = metered(up)
    calls = 500
    client = guard.client(up, transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    with client:
        workers = [
            threading.Thread(target=lambda: [client.get("/") for _ in range(calls)])
            for _ in range(8)
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    s = samples()
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="success") == (
        8 * calls
    )
    assert value(s, "gateway_guard_upstream_attempts_total", upstream=up) == 8 * calls
    count = "gateway_guard_upstream_call_duration_seconds_count"
    assert value(s, count, upstream=up, outcome="success") == 8 * calls


@pytest.mark.implementation
def test_calls_ended_during_a_flush_wait_for_the_next() -> None:
    """Deterministically, what the threads above race for: a flush takes only what it
    counted, and the calls that end meanwhile stay buffered."""
    up = unique("midflush")
    guard = metered(up)
    ended = guard.hooks.call_ended
    assert ended is not None
    buffer = gm._buffers[up]
    counter = buffer.calls

    class Meanwhile:
        """The success counter, while other threads end three calls."""

        def inc(self, amount: float) -> None:
            counter.inc(amount)
            for _ in range(3):
                ended(up, None, "GET", 2, "success", 1, 0.001, 200, None)

    for _ in range(5):
        ended(up, None, "GET", 1, "success", 1, 0.001, 200, None)
    buffer.calls = Meanwhile()  # type: ignore[assignment]
    try:
        gm._flush()
    finally:
        buffer.calls = counter
    assert len(buffer.durations) == 3
    s = samples()
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="success") == 8
    assert value(s, "gateway_guard_upstream_attempts_total", upstream=up) == 8


@pytest.mark.implementation
@pytest.mark.parametrize("in_bulk", [True, False])
def test_buffered_durations_land_in_the_buckets_observe_would_choose(in_bulk: bool) -> None:
    """The bulk add matches prometheus_client's own observe(), bounds included (a value
    equal to a bound is in that bucket); without the layout it relies on, it observes."""
    up = unique("buckets")
    guard = metered(up)
    ended = guard.hooks.call_ended
    assert ended is not None
    gm._buffers[up].in_bulk = in_bulk
    registry = CollectorRegistry()
    reference = Histogram("reference", "", registry=registry, buckets=gm._BUCKETS)
    durations = [0.0, 0.005, 0.0050001, 0.01, 0.024, 1.0, 2.5, 59.9, 60.0, 61.0, 3600.0]
    durations += [k / 1000 for k in range(0, 3000, 7)]
    for duration in durations:
        ended(up, None, "GET", 1, "success", 1, duration, 200, None)
        reference.observe(duration)
    s = samples()
    expected = samples(generate_latest(registry))
    for (name, labels), number in expected.items():
        if name.endswith("_created"):
            continue
        ours = name.replace("reference", "gateway_guard_upstream_call_duration_seconds")
        mine = value(s, ours, upstream=up, outcome="success", **dict(labels))
        assert mine == pytest.approx(number, rel=1e-12), (name, labels)


@pytest.mark.implementation
def test_a_full_buffer_is_added_by_the_call_that_fills_it() -> None:
    up = unique("full")
    guard = metered(up)
    ended = guard.hooks.call_ended
    assert ended is not None
    for _ in range(3 * gm._BATCH + 5):
        ended(up, None, "GET", 1, "success", 1, 0.001, 200, None)
        assert len(gm._buffers[up].durations) < gm._BATCH  # bounded, whoever scrapes
    success = gm._buffers[up].calls
    # Added without a scrape: prometheus_client's own reading of the child.
    assert success._value.get() == 3 * gm._BATCH  # type: ignore[attr-defined]


def test_a_guard_that_dies_leaves_its_buffered_calls_counted() -> None:
    up = unique("dies")
    guard = metered(up)
    with guard.client(up, transport=scripted(200, 200)) as client:
        client.get("/")
        client.get("/")
    del guard, client
    gc.collect()
    s = samples()
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="success") == 2


def test_prometheus_clients_own_exposition_adds_the_buffered_calls() -> None:
    """generate_latest() / start_http_server() on the default registry, not ours."""
    up = unique("own_exposition")
    guard = metered(up)
    with guard.client(up, transport=scripted(200)) as client:
        client.get("/")
    text = generate_latest(REGISTRY)
    assert (
        value(samples(text), "gateway_guard_upstream_calls_total", upstream=up, outcome="success")
        == 1
    )


MULTIPROCESS_CALLS = """
import os, sys, httpx
import gateway_guard as gg

guard = gg.Guard({"metrics": {"enabled": True}, "upstreams": {"mp": {"base_url": "http://up.test"}}})
client = guard.client("mp", transport=httpx.MockTransport(lambda r: httpx.Response(200)))
for _ in range(int(sys.argv[1])):
    client.get("/")
print("called", flush=True)
sys.stdin.readline()  # idle, alive: only the flusher can write the calls out
if sys.argv[2] == "fork":
    # A child forked with calls still buffered does not count the parent's again.
    for _ in range(3):
        client.get("/")
    pid = os.fork()
    if pid == 0:
        for _ in range(4):
            client.get("/")
        import gateway_guard.metrics as gm
        gm._flush()
        os._exit(0)
    os.waitpid(pid, 0)
for _ in range(5):  # then exit at once, before the flusher's next turn: atexit adds them
    client.get("/")
"""


def multiprocess_counts(directory: Path) -> tuple[float, float, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    labels = {"upstream": "mp", "outcome": "success"}
    calls = registry.get_sample_value("gateway_guard_upstream_calls_total", labels)
    attempts = registry.get_sample_value(
        "gateway_guard_upstream_attempts_total", {"upstream": "mp"}
    )
    observed = registry.get_sample_value(
        "gateway_guard_upstream_call_duration_seconds_count", labels
    )
    return calls or 0.0, attempts or 0.0, observed or 0.0


@pytest.mark.parametrize("mode", ["exit", "fork"])
def test_multiprocess_files_have_the_calls_within_a_second(tmp_path: Path, mode: str) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-c", MULTIPROCESS_CALLS, "20", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "called"
        called = time.monotonic()
        while multiprocess_counts(tmp_path) != (20, 20, 20):
            assert time.monotonic() - called < 1.0, multiprocess_counts(tmp_path)
            time.sleep(0.02)
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdin.close()
        process.stdout.close()
    total = 20 + 5 + (3 + 4 if mode == "fork" else 0)
    assert multiprocess_counts(tmp_path) == (total, total, total)
