"""The aiohttp driver (``guard.aiohttp_session`` / ``guard.aiohttp_middleware``) against real
sockets: the same rules as the httpx and requests drivers, and every failure row of
DESIGN §5 provoked for real, raised by bare aiohttp (classified by ``errors.classify``,
which knows aiohttp's exceptions by name) and through the guard.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import trustme

import gateway_guard as gg
from gateway_guard.breaker import BreakerState
from gateway_guard.context import RequestContext, reset_context, set_context
from gateway_guard.errors import from_exception
from gateway_guard.testing.upstream import MisbehavingUpstream

pytestmark = pytest.mark.e2e

FAST_RETRY = {"attempts": 3, "backoff_initial": 0.001, "backoff_max": 0.002, "jitter": False}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MisbehavingUpstream]:
    with MisbehavingUpstream() as up:
        yield up


@pytest.fixture(autouse=True)
def _fresh(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("ok")
    upstream.reset_stats()


def make_guard(url: str, **overrides: Any) -> gg.Guard:
    settings: dict[str, Any] = {
        "base_url": url,
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "deadline": 2.0,
        "retry": dict(FAST_RETRY),
    }
    settings.update(overrides)
    return gg.Guard({"upstreams": {"up": settings}})


def get(guard: gg.Guard, path: str = "/", method: str = "GET", **kwargs: Any) -> Any:
    """Send one request through a new guarded session; the body read whole."""

    async def go() -> Any:
        async with (
            guard.aiohttp_session("up") as session,
            session.request(method, path, **kwargs) as response,
        ):
            return response.status, await response.read()

    return asyncio.run(go())


def test_happy_path_and_base_url(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url)
    status, body = get(guard, "/orders/7")
    assert status == 200
    assert b'"/orders/7"' in body
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)


def test_middleware_on_an_existing_session(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url)
    upstream.set_mode("status", status=503)

    async def go() -> gg.UpstreamStatusError:
        middleware = guard.aiohttp_middleware("up")
        async with aiohttp.ClientSession(middlewares=(middleware,)) as session:
            with pytest.raises(gg.UpstreamStatusError) as info:
                await session.get(upstream.url + "/x")
        return info.value

    error = asyncio.run(go())
    assert (error.attempts, error.received_status) == (3, 503)
    # Every attempt on the one connection: failure bodies are drained, not dropped.
    assert upstream.stats().requests == 3
    assert upstream.stats().connections == 1


def test_import_gateway_guard_does_not_import_aiohttp() -> None:
    code = "import sys, gateway_guard; assert 'aiohttp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_request_id_is_propagated(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url)

    async def go() -> bytes:
        token = set_context(RequestContext(guard=guard, request_id="req-7"))
        try:
            async with guard.aiohttp_session("up") as s, s.get("/") as r:
                return await r.read()
        finally:
            reset_context(token)

    assert json.loads(asyncio.run(go()))["headers"]["x-request-id"] == "req-7"


def test_post_without_idempotency_key_is_sent_once(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("status", status=503)
    with pytest.raises(gg.UpstreamStatusError):
        get(make_guard(upstream.url), "/charges", method="POST", json={"a": 1})
    assert upstream.stats().methods == {"POST": 1}


def test_post_with_idempotency_key_is_retried(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("status", status=503)
    with pytest.raises(gg.UpstreamStatusError):
        get(
            make_guard(upstream.url),
            "/charges",
            method="POST",
            json={"a": 1},
            headers={"Idempotency-Key": "k"},
        )
    assert upstream.stats().methods == {"POST": 3}


def test_retry_after_is_waited(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url, connect_timeout=0.5, deadline=3.0)
    upstream.set_mode("status", status=503, retry_after="1")
    started = time.monotonic()
    with pytest.raises(gg.UpstreamStatusError) as info:
        get(guard)
    assert info.value.retry_after == 1.0
    assert 1.9 <= time.monotonic() - started < 3.0
    assert upstream.stats().requests == 3


def test_breaker_opens_and_fails_fast(upstream: MisbehavingUpstream) -> None:
    breaker = {"min_calls": 2, "window_size": 2, "failure_rate": 0.5, "open_seconds": 30.0}
    guard = make_guard(upstream.url, retry={"attempts": 1}, breaker=breaker)
    upstream.set_mode("status", status=502)
    for _ in range(2):
        with pytest.raises(gg.UpstreamStatusError):
            get(guard)
    assert guard.breaker("up").state is BreakerState.OPEN
    with pytest.raises(gg.CircuitOpenError):
        get(guard)
    assert upstream.stats().requests == 2


def test_bulkhead_sheds_when_full(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url, bulkhead={"max_concurrent": 1})
    upstream.set_mode("slow", delay_ms=300)

    async def go() -> list[Any]:
        async with guard.aiohttp_session("up") as s:

            async def one() -> int:
                async with s.get("/") as r:
                    return r.status

            first = asyncio.create_task(one())
            await asyncio.sleep(0.05)
            return await asyncio.gather(first, one(), return_exceptions=True)

    first, second = asyncio.run(go())
    assert first == 200
    assert isinstance(second, gg.LoadShedError)


@pytest.mark.parametrize("mode", ["hang", "drip_headers", "drip_body"])
def test_slow_upstreams_end_at_the_deadline(upstream: MisbehavingUpstream, mode: str) -> None:
    guard = make_guard(upstream.url, read_timeout=0.4, deadline=1.0)
    upstream.set_mode(mode, drip_ms=50)
    started = time.monotonic()
    with pytest.raises(gg.UpstreamTimeout) as info:
        get(guard)
    assert 0.9 <= time.monotonic() - started < 1.6
    assert info.value.status == 504
    if mode != "hang":
        assert info.value.proxy_error == "http_response_timeout"
    assert guard.breaker("up").snapshot().failures == 1


def test_inbound_deadline_clips_the_call(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url)
    upstream.set_mode("drip_headers", drip_ms=50)

    async def go() -> None:
        token = set_context(
            RequestContext(guard=guard, request_id="r", deadline_at=guard.clock() + 0.5)
        )
        try:
            async with guard.aiohttp_session("up") as s:
                await s.get("/")
        finally:
            reset_context(token)

    started = time.monotonic()
    with pytest.raises(gg.UpstreamTimeout):
        asyncio.run(go())
    assert time.monotonic() - started < 1.0


def test_body_that_breaks_off_is_one_failure(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url)
    upstream.set_mode("truncated")
    with pytest.raises(aiohttp.ClientPayloadError) as info:
        get(guard)
    error = from_exception(info.value)
    assert (error.status, error.proxy_error) == (502, "http_response_incomplete")
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)
    assert upstream.stats().requests == 1


def test_body_released_early_gives_back_a_probe(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream.url)
    breaker = guard.breaker("up")
    upstream.set_mode("drip_body", drip_ms=50)

    async def go() -> None:
        async with guard.aiohttp_session("up") as s:
            response = await s.get("/")
            response.close()

    asyncio.run(go())
    snapshot = breaker.snapshot()
    assert (snapshot.calls, snapshot.probes_in_flight) == (0, 0)


PROBING = {"min_calls": 1, "window_size": 1, "open_seconds": 0.05, "half_open_calls": 1}


def test_a_dropped_response_is_settled_by_its_deadline(upstream: MisbehavingUpstream) -> None:
    # A half-open breaker: the call is its one probe. aiohttp keeps a response whose body
    # is still arriving alive (its connection's protocol holds it) even when the caller
    # drops it: the deadline cuts it off, and the probe slot comes back with the failure.
    guard = make_guard(
        upstream.url,
        retry={"attempts": 1},
        breaker=PROBING,
        deadline=0.5,
        connect_timeout=0.4,
        read_timeout=0.4,
    )
    breaker = guard.breaker("up")

    async def go() -> None:
        async with guard.aiohttp_session("up") as s:
            upstream.set_mode("status", status=502)
            with pytest.raises(gg.UpstreamStatusError):
                await s.get("/")
            await asyncio.sleep(0.1)
            upstream.set_mode("drip_body", drip_ms=50)
            response = await s.get("/")
            assert breaker.snapshot().probes_in_flight == 1
            del response
            gc.collect()
            await asyncio.sleep(0.7)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # aiohttp's "Unclosed response"
        asyncio.run(go())
    snapshot = breaker.snapshot()
    assert snapshot.probes_in_flight == 0
    assert snapshot.consecutive_opens == 2  # the probe failed: it opened again


# --- classification: every row, for real --------------------------------------------------------


def bare_failure(url: str, **kwargs: Any) -> BaseException:
    async def go() -> BaseException | None:
        timeout = kwargs.pop("timeout", aiohttp.ClientTimeout(total=5.0))
        async with aiohttp.ClientSession(timeout=timeout) as s:
            try:
                async with s.get(url, **kwargs) as r:
                    await r.read()
            except Exception as exc:
                return exc
        return None

    exc = asyncio.run(go())
    assert exc is not None, f"GET {url} succeeded"
    return exc


def assert_row(
    url: str, cls: type[gg.UpstreamError], proxy_error: str, status: int, **kw: Any
) -> None:
    bare = from_exception(bare_failure(url, **kw.pop("bare", {})))
    assert (type(bare), bare.proxy_error, bare.status) == (cls, proxy_error, status), repr(
        bare.__cause__
    )
    with pytest.raises(gg.UpstreamError) as info:
        get(make_guard(url, retry={"attempts": 1}, **kw))
    guarded = info.value
    assert (type(guarded), guarded.proxy_error, guarded.status) == (cls, proxy_error, status)


def test_row_dns_error() -> None:
    assert_row("http://nonexistent.invalid", gg.UpstreamConnectError, "dns_error", 502)


def test_row_connection_refused(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("refuse")
    assert_row(upstream.url, gg.UpstreamConnectError, "connection_refused", 502)


def test_row_no_route_to_host() -> None:
    assert_row("http://224.0.0.1:80", gg.UpstreamConnectError, "destination_ip_unroutable", 502)


def test_row_connect_timeout() -> None:
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        assert_row(
            f"http://127.0.0.1:{port}",
            gg.UpstreamTimeout,
            "connection_timeout",
            504,
            connect_timeout=0.2,
            bare={"timeout": aiohttp.ClientTimeout(sock_connect=0.2)},
        )
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_row_tls_certificate_untrusted() -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with MisbehavingUpstream(tls=context) as up:
        assert_row(up.url, gg.UpstreamConnectError, "tls_certificate_error", 502)


def test_row_tls_spoken_to_a_plain_port(upstream: MisbehavingUpstream) -> None:
    url = upstream.url.replace("http://", "https://")
    assert_row(url, gg.UpstreamConnectError, "tls_protocol_error", 502)


def test_row_read_timeout(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("hang")
    assert_row(
        upstream.url,
        gg.UpstreamTimeout,
        "connection_read_timeout",
        504,
        read_timeout=0.2,
        bare={"timeout": aiohttp.ClientTimeout(sock_read=0.2)},
    )


def test_row_malformed_response(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("garbage")
    assert_row(upstream.url, gg.UpstreamProtocolError, "http_protocol_error", 502)


def test_row_reset_mid_exchange(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("reset")
    assert_row(upstream.url, gg.UpstreamProtocolError, "connection_terminated", 502)


def test_row_truncated_response(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("truncated")
    error = from_exception(bare_failure(upstream.url))
    assert (type(error), error.proxy_error) == (
        gg.UpstreamProtocolError,
        "http_response_incomplete",
    )
