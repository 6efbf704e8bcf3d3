"""The guarded transports, sync and async, over httpx.MockTransport.

Every behaviour is checked through both drivers (the ``driver`` fixture), because the
drivers are separate loops around one decision core and each could drop a decision.
Nothing here sleeps: retry waits are removed by testing mode (or recorded by a patched
sleep where the wait itself is under test), and time moves on a fake clock.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard import retry
from gateway_guard.breaker import HALF_OPEN_RETRY_AFTER, BreakerState
from gateway_guard.context import (
    MAX_RECORDS,
    CallRecord,
    RequestContext,
    reset_context,
    set_context,
)
from gateway_guard.headers import parse_traceparent
from gateway_guard.inbound._start import start
from gateway_guard.testing import FakeClock

BASE_URL = "http://up.test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
# Default policy timeouts (DESIGN §2), as the httpx timeout extension carries them.
DEFAULT_TIMEOUTS = {"connect": 1.0, "read": 3.0, "write": 3.0, "pool": 1.0}
# Bounds every wait for another thread or task, so a bug fails the test instead of hanging.
WAIT = 5.0

# A breaker that trips on the 4th failure in a row, and no retries to muddle the counts.
TRIPPY = {
    "retry": {"attempts": 1},
    "breaker": {
        "min_calls": 4,
        "window_size": 4,
        "open_seconds": 30.0,
        "half_open_calls": 2,
        "failure_rate": 0.5,  # so one failed probe of two re-opens it
    },
}
# A breaker that never trips and whose window holds every call of a stress test.
NEVER_TRIPS = {"breaker": {"window_size": 10_000, "min_calls": 10_000, "failure_rate": 1.0}}


# --- a scripted upstream -------------------------------------------------------------------

Step = Callable[[httpx.Request], httpx.Response]


def status(code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Step:
    def step(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, content=body, headers=headers)

    return step


OK = status(200, b"hello")


def fail(exc_type: type[httpx.TransportError], message: str = "boom") -> Step:
    def step(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return step


def after(clock: FakeClock, seconds: float, step: Step) -> Step:
    """``step``, taking ``seconds`` of the fake clock."""

    def timed(request: httpx.Request) -> httpx.Response:
        clock.advance(seconds)
        return step(request)

    return timed


class ChunkStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body served in chunks, optionally breaking after the last one."""

    def __init__(self, chunks: Iterable[bytes], error: Exception | None = None) -> None:
        self._chunks = list(chunks)
        self._error = error

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks
        if self._error is not None:
            raise self._error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        if self._error is not None:
            raise self._error


def broken_body(message: str) -> Step:
    """200 with headers promising 100 bytes, then the connection breaks after 7."""

    def step(request: httpx.Request) -> httpx.Response:
        error = httpx.RemoteProtocolError(message, request=request)
        return httpx.Response(
            200, headers={"content-length": "100"}, stream=ChunkStream([b"partial"], error)
        )

    return step


INCOMPLETE = (
    "peer closed connection without sending complete message body (received 7 bytes, expected 100)"
)


class Upstream:
    """A MockTransport handler: request n takes step n, the last step repeats."""

    def __init__(self, *steps: Step) -> None:
        self._steps = list(steps) or [OK]
        self._lock = threading.Lock()
        self.requests: list[httpx.Request] = []
        self.timeouts: list[dict[str, float]] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            index = len(self.requests)
            self.requests.append(request)
            # Copied: the guard may hand every request the same (read-only) mapping.
            self.timeouts.append(dict(request.extensions["timeout"]))
            step = self._steps[min(index, len(self._steps) - 1)]
        return step(request)


# --- the two drivers -----------------------------------------------------------------------


class SyncDriver:
    kind = "sync"

    def send(
        self,
        guard: gg.Guard,
        handler: Callable[[httpx.Request], httpx.Response],
        method: str = "GET",
        url: str = "/x",
        *,
        upstream: str = "up",
        **kwargs: Any,
    ) -> httpx.Response:
        with guard.client(upstream, transport=httpx.MockTransport(handler)) as client:
            return client.request(method, url, **kwargs)

    def stream(
        self,
        guard: gg.Guard,
        handler: Callable[[httpx.Request], httpx.Response],
        method: str = "GET",
        *,
        send: bool = False,
        **kwargs: Any,
    ) -> list[bytes]:
        """``client.stream()``: the raw body chunks as the caller receives them (with
        ``send=True``, ``client.send(request, stream=True)``: the decoded chunks)."""
        with guard.client("up", transport=httpx.MockTransport(handler)) as client:
            if send:
                response = client.send(client.build_request(method, "/x"), stream=True)
                try:
                    # iter_bytes: a body read within the attempt is no longer raw.
                    return list(response.iter_bytes())
                finally:
                    response.close()
            with client.stream(method, "/x", **kwargs) as response:
                return list(response.iter_raw())

    def send_many(
        self, guard: gg.Guard, handler: Callable[[httpx.Request], httpx.Response], n: int
    ) -> list[httpx.Response | BaseException]:
        """``n`` GETs through one client, one after the other."""
        results: list[httpx.Response | BaseException] = []
        with guard.client("up", transport=httpx.MockTransport(handler)) as client:
            for _ in range(n):
                try:
                    results.append(client.get("/x"))
                except gg.UpstreamError as exc:
                    results.append(exc)
        return results

    def body(self, chunks: list[bytes]) -> Any:
        return iter(chunks)


class AsyncDriver:
    kind = "async"

    @staticmethod
    def _async(
        handler: Callable[[httpx.Request], httpx.Response],
    ) -> Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]:
        async def async_handler(request: httpx.Request) -> httpx.Response:
            return handler(request)

        return async_handler

    def send(
        self,
        guard: gg.Guard,
        handler: Callable[[httpx.Request], httpx.Response],
        method: str = "GET",
        url: str = "/x",
        *,
        upstream: str = "up",
        **kwargs: Any,
    ) -> httpx.Response:
        async def main() -> httpx.Response:
            mock = httpx.MockTransport(self._async(handler))
            async with guard.async_client(upstream, transport=mock) as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(main())

    def stream(
        self,
        guard: gg.Guard,
        handler: Callable[[httpx.Request], httpx.Response],
        method: str = "GET",
        *,
        send: bool = False,
        **kwargs: Any,
    ) -> list[bytes]:
        async def main() -> list[bytes]:
            mock = httpx.MockTransport(self._async(handler))
            async with guard.async_client("up", transport=mock) as client:
                if send:
                    request = client.build_request(method, "/x")
                    response = await client.send(request, stream=True)
                    try:
                        return [chunk async for chunk in response.aiter_bytes()]
                    finally:
                        await response.aclose()
                async with client.stream(method, "/x", **kwargs) as response:
                    return [chunk async for chunk in response.aiter_raw()]

        return asyncio.run(main())

    def send_many(
        self, guard: gg.Guard, handler: Callable[[httpx.Request], httpx.Response], n: int
    ) -> list[httpx.Response | BaseException]:
        """``n`` GETs through one client, all at once."""

        async def one(client: httpx.AsyncClient) -> httpx.Response | BaseException:
            try:
                return await client.get("/x")
            except gg.UpstreamError as exc:
                return exc

        async def main() -> list[httpx.Response | BaseException]:
            mock = httpx.MockTransport(self._async(handler))
            async with guard.async_client("up", transport=mock) as client:
                return list(await asyncio.gather(*(one(client) for _ in range(n))))

        return asyncio.run(main())

    def body(self, chunks: list[bytes]) -> Any:
        async def gen() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return gen()


Driver = SyncDriver | AsyncDriver


@pytest.fixture(params=[SyncDriver(), AsyncDriver()], ids=lambda d: d.kind)
def driver(request: pytest.FixtureRequest) -> Driver:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _testing_mode() -> Iterator[None]:
    with retry.testing():
        yield


@pytest.fixture
def clock() -> FakeClock:
    """The Guard's clock: deadlines, breakers, budgets and bulkheads all read it."""
    return FakeClock()


def make_guard(clock: FakeClock, **upstream: Any) -> gg.Guard:
    """A Guard with upstream ``up`` at BASE_URL; keyword arguments are its settings keys."""
    routes = upstream.pop("routes", [])
    return gg.Guard(
        {"upstreams": {"up": {"base_url": BASE_URL, **upstream}}, "routes": routes},
        clock=clock,
    )


class SleepRecorder:
    """Stands in for time.sleep and asyncio.sleep; ``then`` may move the fake clock."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.then: Callable[[float], None] | None = None

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.then is not None:
            self.then(seconds)

    async def async_sleep(self, seconds: float, result: Any = None) -> Any:
        self.sleep(seconds)
        return result


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> SleepRecorder:
    """Testing mode off, so waits are real numbers, and sleeping only recorded."""
    recorder = SleepRecorder()
    retry.set_testing(False)  # the autouse fixture restores testing mode afterwards
    monkeypatch.setattr("gateway_guard.transport.time.sleep", recorder.sleep)
    monkeypatch.setattr("gateway_guard.transport.asyncio.sleep", recorder.async_sleep)
    return recorder


@pytest.fixture
def context() -> Iterator[Callable[..., RequestContext]]:
    """Enter a RequestContext (as a middleware would) for the rest of the test."""
    tokens = []

    def enter(guard: gg.Guard, **fields: Any) -> RequestContext:
        fields.setdefault("request_id", "req-123")
        ctx = RequestContext(guard=guard, **fields)
        tokens.append(set_context(ctx))
        return ctx

    yield enter
    for token in reversed(tokens):
        reset_context(token)


def trip(driver: Driver, guard: gg.Guard, failures: int = 4) -> None:
    """Open the breaker of ``up`` (with the TRIPPY settings) through the driver."""
    handler = Upstream(status(503))
    for _ in range(failures):
        with pytest.raises(gg.UpstreamStatusError):
            driver.send(guard, handler)
    assert guard.breaker("up").state is BreakerState.OPEN


# --- happy path ------------------------------------------------------------------------------


def test_happy_path(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(200, b"hello", {"content-type": "text/plain"}))

    response = driver.send(guard, handler, "GET", "/things?q=1")

    assert response.status_code == 200
    assert response.text == "hello"
    assert handler.calls == 1
    assert str(handler.requests[0].url) == f"{BASE_URL}/things?q=1"
    assert guard.breaker("up").state is BreakerState.CLOSED
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)
    assert guard.bulkhead("up").in_flight == 0


def test_streamed_response_body_passes_through(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    chunks = [b"a" * 1000, b"b" * 1000, b"c"]
    handler = Upstream(lambda request: httpx.Response(200, stream=ChunkStream(chunks)))

    response = driver.send(guard, handler)

    assert response.content == b"".join(chunks)
    assert guard.breaker("up").snapshot().failures == 0


# --- failure statuses --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [502, 503, 504])
def test_retry_on_status_then_status_error(driver: Driver, clock: FakeClock, code: int) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(code, b"upstream says no"))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    error = info.value
    assert handler.calls == 3
    assert error.status == 502
    assert error.proxy_error is None
    assert error.received_status == code
    assert error.attempts == 3
    assert error.upstream == "up"
    assert error.response is not None
    assert error.response.status_code == code
    assert error.response.content == b"upstream says no"
    assert error.response.is_closed


def test_retry_stops_at_the_first_success(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(503), status(200, b"at last"))

    response = driver.send(guard, handler)

    assert response.text == "at last"
    assert handler.calls == 2


def test_the_breaker_counts_a_call_once_by_its_last_attempt(
    driver: Driver, clock: FakeClock
) -> None:
    # Issue #15: counting every attempt made a 50%-failing upstream look 50% failed to the
    # breaker, when retries left the callers ~12% failed.
    guard = make_guard(clock)
    driver.send(guard, Upstream(status(503), status(200)))
    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, Upstream(status(503)))
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (2, 1)


def test_an_upstream_429_is_no_breaker_failure_even_when_listed(
    driver: Driver, clock: FakeClock
) -> None:
    guard = make_guard(
        clock,
        retry={"attempts": 1},
        breaker={"failure_status": [429, 503], "min_calls": 1, "window_size": 1},
    )
    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, Upstream(status(429)))
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.state, snapshot.failures) == (BreakerState.CLOSED, 0)


def test_consecutive_timeouts_open_the_breaker_of_one_hung_caller(
    driver: Driver, clock: FakeClock
) -> None:
    # One worker, one call at a time: three timed-out attempts in a row open it, long
    # before min_calls (10) calls could.
    guard = make_guard(clock, read_timeout=2.0, deadline=30.0)
    handler = Upstream(after(clock, 2.0, fail(httpx.ReadTimeout, "timed out")))
    with pytest.raises(gg.UpstreamTimeout):
        driver.send(guard, handler)
    assert handler.calls == 3
    assert guard.breaker("up").state is BreakerState.OPEN


def test_attempts_setting_is_respected(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, retry={"attempts": 5})
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    assert handler.calls == 5
    assert info.value.attempts == 5


def test_streamed_failure_body_is_kept_capped_and_closed(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, retry={"attempts": 1})
    chunks = [b"x" * 16384] * 8  # 128 KiB: more than is kept for logs
    handler = Upstream(lambda request: httpx.Response(503, stream=ChunkStream(chunks)))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    response = info.value.response
    assert response is not None
    assert response.is_closed
    assert response.content == b"x" * (64 * 1024)


def test_streamed_failure_body_is_kept_decoded(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, retry={"attempts": 1})
    body = gzip.compress(b"upstream exploded")

    def step(request: httpx.Request) -> httpx.Response:
        # As a real transport answers: headers first, the body still to be read.
        return httpx.Response(503, headers={"content-encoding": "gzip"}, stream=ChunkStream([body]))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, Upstream(step))

    assert info.value.response is not None
    assert info.value.response.content == b"upstream exploded"


def test_status_error_response_knows_its_request(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, retry={"attempts": 1})

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, Upstream(status(503)))

    response = info.value.response
    assert response is not None
    # What an error handler would log; httpx raises RuntimeError if the request is unset.
    assert response.request.url == f"{BASE_URL}/x"


def test_final_failure_response_returned_when_not_raising(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, raise_on_failure_status=False)
    handler = Upstream(status(503, b"try later"))

    response = driver.send(guard, handler)

    assert handler.calls == 3
    assert response.status_code == 503
    assert response.content == b"try later"


def test_500_is_not_retried_but_raises(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(500))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    assert handler.calls == 1
    assert info.value.status == 502
    assert info.value.received_status == 500
    assert info.value.attempts == 1
    assert guard.breaker("up").snapshot().failures == 1


@pytest.mark.parametrize("code", [400, 404, 409, 429])
def test_4xx_is_returned_not_retried_not_a_failure(
    driver: Driver, clock: FakeClock, code: int
) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(code, b"client error"))

    response = driver.send(guard, handler)

    assert response.status_code == code
    assert response.content == b"client error"
    assert handler.calls == 1
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)


# --- idempotency ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "upstream", "calls"),
    [
        ("POST", {}, {}, 1),
        ("PATCH", {}, {}, 1),
        ("POST", {"Idempotency-Key": "k-1"}, {}, 3),
        ("POST", {}, {"retry": {"retry_non_idempotent": True}}, 3),
        ("PUT", {}, {}, 3),
        ("DELETE", {}, {}, 3),
    ],
    ids=["post", "patch", "post-idempotency-key", "post-opt-in", "put", "delete"],
)
def test_failure_status_retried_only_when_replayable(
    driver: Driver,
    clock: FakeClock,
    *,
    method: str,
    headers: dict[str, str],
    upstream: dict[str, Any],
    calls: int,
) -> None:
    guard = make_guard(clock, **upstream)
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler, method, "/x", content=b"{}", headers=headers)

    assert handler.calls == calls
    assert info.value.attempts == calls
    # Every attempt carried the whole body.
    assert all(request.content == b"{}" for request in handler.requests)


def test_post_whose_connect_failed_is_retried(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream(fail(httpx.ConnectError, "[Errno 111] Connection refused"), OK)

    response = driver.send(guard, handler, "POST", "/charges", content=b"{}")

    assert response.status_code == 200
    assert handler.calls == 2


def test_post_whose_read_timed_out_is_not_retried(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream(fail(httpx.ReadTimeout, "timed out"), OK)

    with pytest.raises(gg.UpstreamTimeout) as info:
        driver.send(guard, handler, "POST", "/charges", content=b"{}")

    assert handler.calls == 1
    assert info.value.status == 504
    assert info.value.proxy_error == "connection_read_timeout"
    assert info.value.attempts == 1


@pytest.mark.parametrize(
    "step",
    [status(503), fail(httpx.ConnectError, "[Errno 111] Connection refused")],
    ids=["503", "connect-error"],
)
def test_streaming_request_body_is_never_retried(
    driver: Driver, clock: FakeClock, step: Step
) -> None:
    guard = make_guard(clock)
    handler = Upstream(step, OK)

    with pytest.raises(gg.UpstreamError):
        driver.send(guard, handler, "PUT", "/upload", content=driver.body([b"a", b"b"]))

    assert handler.calls == 1
    assert handler.requests[0].content == b"ab"


# --- transport errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc_type", "message", "error_type", "code", "proxy_error", "calls"),
    [
        (
            httpx.ConnectError,
            "[Errno 111] Connection refused",
            gg.UpstreamConnectError,
            502,
            "connection_refused",
            3,
        ),
        (
            httpx.ConnectError,
            "[Errno -2] Name or service not known",
            gg.UpstreamConnectError,
            502,
            "dns_error",
            3,
        ),
        (httpx.ConnectTimeout, "timed out", gg.UpstreamTimeout, 504, "connection_timeout", 3),
        (httpx.ReadTimeout, "timed out", gg.UpstreamTimeout, 504, "connection_read_timeout", 3),
        (httpx.WriteTimeout, "timed out", gg.UpstreamTimeout, 504, "connection_write_timeout", 3),
        (
            httpx.RemoteProtocolError,
            "Server disconnected without sending a response.",
            gg.UpstreamProtocolError,
            502,
            "connection_terminated",
            3,
        ),
        (
            httpx.RemoteProtocolError,
            "illegal status line: bytearray(b'garbage')",
            gg.UpstreamProtocolError,
            502,
            "http_protocol_error",
            3,
        ),
        (httpx.ReadError, "", gg.UpstreamProtocolError, 502, "connection_terminated", 3),
        (httpx.PoolTimeout, "", gg.LoadShedError, 503, "connection_limit_reached", 3),
    ],
    ids=[
        "refused",
        "dns",
        "connect-timeout",
        "read-timeout",
        "write-timeout",
        "disconnected",
        "malformed",
        "read-error",
        "pool-timeout",
    ],
)
def test_transport_errors_are_classified_retried_and_chained(
    driver: Driver,
    clock: FakeClock,
    *,
    exc_type: type[httpx.TransportError],
    message: str,
    error_type: type[gg.UpstreamError],
    code: int,
    proxy_error: str,
    calls: int,
) -> None:
    guard = make_guard(clock)
    handler = Upstream(after(clock, 0.25, fail(exc_type, message)))

    with pytest.raises(gg.UpstreamError) as info:
        driver.send(guard, handler)

    error = info.value
    assert type(error) is error_type
    assert error.status == code
    assert error.proxy_error == proxy_error
    assert error.upstream == "up"
    assert handler.calls == calls
    assert error.attempts == calls
    assert error.elapsed == pytest.approx(0.25 * calls)
    assert type(error.__cause__) is exc_type
    # Our own exhausted connection pool is no evidence against the upstream; the breaker
    # counts the call once, by its last attempt, however many attempts it took.
    expected_failures = 0 if error_type is gg.LoadShedError else 1
    assert guard.breaker("up").snapshot().failures == expected_failures


def test_configuration_error_is_not_retried_nor_counted(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream(fail(httpx.UnsupportedProtocol, "unsupported protocol 'ftp://'"))

    with pytest.raises(gg.UpstreamConfigError) as info:
        driver.send(guard, handler)

    assert info.value.status == 500
    assert info.value.proxy_error == "proxy_configuration_error"
    assert isinstance(info.value.__cause__, httpx.UnsupportedProtocol)
    assert handler.calls == 1
    assert guard.breaker("up").snapshot().calls == 0


def test_connect_error_retried_then_succeeds(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    refused = fail(httpx.ConnectError, "[Errno 111] Connection refused")
    handler = Upstream(refused, refused, OK)

    assert driver.send(guard, handler).status_code == 200
    assert handler.calls == 3


# --- Retry-After -----------------------------------------------------------------------------


@pytest.mark.implementation
def test_retry_after_is_waited(driver: Driver, clock: FakeClock, sleeps: SleepRecorder) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(503, headers={"Retry-After": "1"}), OK)

    assert driver.send(guard, handler).status_code == 200

    assert handler.calls == 2
    assert len(sleeps.waits) == 1
    assert sleeps.waits[0] >= 1.0


@pytest.mark.implementation
def test_repeated_retry_after_headers_are_honoured(
    driver: Driver, clock: FakeClock, sleeps: SleepRecorder
) -> None:
    # Defect 7 of #15: httpx joins the two fields into "2, 2", which was ignored, and the
    # retry came after the 0.1 s backoff instead of the 2 s the upstream asked for.
    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers=[("Retry-After", "2"), ("Retry-After", "2")])

    handler = Upstream(busy, OK)

    assert driver.send(make_guard(clock), handler).status_code == 200

    assert handler.calls == 2
    assert sleeps.waits == [2.0]


@pytest.mark.implementation
def test_retry_after_is_waited_before_every_retry(
    driver: Driver, clock: FakeClock, sleeps: SleepRecorder
) -> None:
    guard = make_guard(clock)
    handler = Upstream(status(503, headers={"Retry-After": "2"}))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    assert handler.calls == 3
    assert len(sleeps.waits) == 2
    assert min(sleeps.waits) >= 2.0
    assert info.value.retry_after == 2.0


@pytest.mark.implementation
def test_backoff_without_retry_after_is_short(
    driver: Driver, clock: FakeClock, sleeps: SleepRecorder
) -> None:
    guard = make_guard(clock, retry={"backoff_initial": 0.1, "backoff_max": 0.5})
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, handler)

    assert len(sleeps.waits) == 2
    assert all(0.0 <= wait <= 0.5 for wait in sleeps.waits)


@pytest.mark.implementation
def test_backoff_after_a_transport_error(
    driver: Driver, clock: FakeClock, sleeps: SleepRecorder
) -> None:
    guard = make_guard(clock, retry={"backoff_initial": 0.2, "backoff_max": 0.2, "jitter": False})
    handler = Upstream(fail(httpx.ConnectError, "[Errno 111] Connection refused"))

    with pytest.raises(gg.UpstreamConnectError):
        driver.send(guard, handler)

    assert handler.calls == 3
    assert sleeps.waits == [pytest.approx(0.2), pytest.approx(0.2)]


@pytest.mark.implementation
def test_retry_after_above_the_maximum_fails_fast(
    driver: Driver, clock: FakeClock, sleeps: SleepRecorder
) -> None:
    guard = make_guard(clock, retry={"max_retry_after": 30.0})
    handler = Upstream(status(503, headers={"Retry-After": "120"}), OK)

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    assert handler.calls == 1
    assert sleeps.waits == []
    assert info.value.retry_after == 120.0
    assert info.value.received_status == 503


@pytest.mark.implementation
def test_testing_mode_does_not_wait_for_retry_after(
    driver: Driver, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SleepRecorder()
    monkeypatch.setattr("gateway_guard.transport.time.sleep", recorder.sleep)
    monkeypatch.setattr("gateway_guard.transport.asyncio.sleep", recorder.async_sleep)
    guard = make_guard(clock)
    handler = Upstream(status(503, headers={"Retry-After": "2"}), OK)

    assert driver.send(guard, handler).status_code == 200
    assert handler.calls == 2
    assert recorder.waits == []


# --- deadline and per-attempt timeouts -----------------------------------------------------


def test_attempt_timeouts_are_the_policys(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, connect_timeout=1.0, read_timeout=4.0)
    handler = Upstream()

    driver.send(guard, handler)

    assert handler.timeouts == [{"connect": 1.0, "read": 4.0, "write": 4.0, "pool": 1.0}]


def test_attempt_timeouts_are_clipped_to_the_deadline(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)  # deadline 4 s, connect 1 s, read 3 s
    handler = Upstream(after(clock, 2.5, status(503)), OK)

    assert driver.send(guard, handler).status_code == 200

    assert handler.timeouts[0] == DEFAULT_TIMEOUTS
    assert handler.timeouts[1] == pytest.approx(
        {"connect": 1.0, "read": 1.5, "write": 1.5, "pool": 1.0}
    )


def test_deadline_stops_retries(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)  # deadline 4 s
    handler = Upstream(after(clock, 2.5, status(503)))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    # The second attempt ends past the deadline: there is no time for a third.
    assert handler.calls == 2
    assert info.value.attempts == 2
    assert handler.timeouts[1] == pytest.approx(
        {"connect": 1.0, "read": 1.5, "write": 1.5, "pool": 1.0}
    )


@pytest.mark.implementation
def test_deadline_exhausted_during_the_wait_raises_timeout(
    driver: Driver, clock: FakeClock, sleeps: SleepRecorder
) -> None:
    guard = make_guard(clock)
    # The wait before the retry oversleeps past the deadline (a stalled process).
    sleeps.then = lambda seconds: clock.advance(60.0)
    handler = Upstream(status(503), OK)

    with pytest.raises(gg.UpstreamTimeout) as info:
        driver.send(guard, handler)

    assert handler.calls == 1
    assert info.value.status == 504
    assert info.value.proxy_error == "http_response_timeout"
    assert info.value.attempts == 1


def test_inbound_deadline_clips_attempt_timeouts(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    context(guard, deadline_at=clock.now + 0.5)
    handler = Upstream()

    driver.send(guard, handler)

    assert handler.timeouts == [
        pytest.approx({"connect": 0.5, "read": 0.5, "write": 0.5, "pool": 0.5})
    ]


def test_inbound_deadline_already_passed(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    ctx = context(guard, deadline_at=clock.now)
    handler = Upstream()

    with pytest.raises(gg.UpstreamTimeout) as info:
        driver.send(guard, handler)

    assert handler.calls == 0
    assert info.value.status == 504
    assert info.value.proxy_error == "http_response_timeout"
    assert info.value.attempts == 0
    assert [call.error for call in ctx.calls] == ["http_response_timeout"]
    assert guard.bulkhead("up").in_flight == 0


def test_deadline_follows_the_guards_clock(driver: Driver) -> None:
    clock = FakeClock()  # deliberately not patched into the transport
    guard = make_guard(clock)
    handler = Upstream(after(clock, 2.5, status(503)))

    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, handler)

    assert handler.calls == 2


# --- route policies ---------------------------------------------------------------------


ROUTES = [
    {"path": "/orders/{id}", "retry": {"attempts": 1}},
    {"path": "/reports/{rest:path}", "deadline": 2.0},
]


def test_route_policy_disables_retries(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock, routes=ROUTES)
    route = guard.policies.routes.resolve("GET", "/orders/42")[1]
    assert route is not None
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, handler)
    assert handler.calls == 3  # outside the route: the upstream's policy

    context(guard, route=route)
    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)
    assert handler.calls == 4
    assert info.value.attempts == 1


def test_route_deadline_caps_the_call(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock, routes=ROUTES)
    route = guard.policies.routes.resolve("GET", "/reports/2024/q1")[1]
    assert route is not None
    context(guard, route=route)
    handler = Upstream()

    driver.send(guard, handler)

    assert handler.timeouts == [{"connect": 1.0, "read": 2.0, "write": 2.0, "pool": 1.0}]


def test_route_for_another_path_changes_nothing(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock, routes=ROUTES)
    context(guard, route=guard.policies.routes.resolve("GET", "/nothing")[1])
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, handler)
    assert handler.calls == 3


# --- propagation and call records ------------------------------------------------------------


def test_request_id_and_trace_are_propagated(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    inbound = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    context(guard, request_id="req-abc", trace_id=TRACE_ID, traceparent=inbound)
    handler = Upstream()

    driver.send(guard, handler)

    headers = handler.requests[0].headers
    assert headers["x-request-id"] == "req-abc"
    # Passed on as it came: its parent-id is the caller's span, which exists.
    assert headers["traceparent"] == inbound


def test_no_trace_is_invented_without_an_inbound_one(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    context(guard)
    handler = Upstream()

    driver.send(guard, handler)

    assert "traceparent" not in handler.requests[0].headers


def test_a_trace_is_started_when_the_settings_ask(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = gg.Guard(
        {"upstreams": {"up": {"base_url": BASE_URL}}, "tracing": {"start_traces": True}},
        clock=clock,
    )
    context(guard)
    handler = Upstream()

    driver.send(guard, handler)

    parsed = parse_traceparent(handler.requests[0].headers["traceparent"])
    assert parsed is not None and parsed[2] == "01"


def test_callers_own_headers_are_kept(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    context(guard, request_id="req-abc", trace_id=TRACE_ID)
    mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    handler = Upstream()

    driver.send(guard, handler, headers={"X-Request-ID": "mine-1", "traceparent": mine})

    headers = handler.requests[0].headers
    assert headers.get_list("x-request-id") == ["mine-1"]
    assert headers.get_list("traceparent") == [mine]


def test_propagation_agrees_with_httpx_headers_for_any_value(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    # The httpx driver writes httpx's raw header list directly; what the upstream gets
    # must be what Headers.__setitem__ would have sent, and a caller's header in any case
    # is still the caller's.
    inbound = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    guard = make_guard(clock)
    context(guard, request_id="req/a.b:c@d+e=f_g", trace_id=TRACE_ID, traceparent=inbound)
    handler = Upstream()

    driver.send(guard, handler)
    driver.send(guard, handler, headers={"TraceParent": "mine"})

    first, second = (request.headers for request in handler.requests)
    expected = httpx.Headers()
    expected["X-Request-ID"] = "req/a.b:c@d+e=f_g"
    expected["traceparent"] = inbound
    assert first.raw[-2:] == expected.raw
    assert second.get_list("traceparent") == ["mine"]
    assert second.get_list("x-request-id") == ["req/a.b:c@d+e=f_g"]


def test_nothing_is_propagated_outside_a_context(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock)
    handler = Upstream()

    driver.send(guard, handler)

    assert "x-request-id" not in handler.requests[0].headers
    assert "traceparent" not in handler.requests[0].headers


def test_calls_are_recorded_in_the_context(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    ctx = context(guard)

    driver.send(guard, Upstream(after(clock, 0.5, status(503)), after(clock, 0.25, OK)))
    with pytest.raises(gg.UpstreamConnectError):
        driver.send(guard, Upstream(fail(httpx.ConnectError, "[Errno 111] Connection refused")))
    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, Upstream(status(500)))

    assert ctx.calls == [
        CallRecord(upstream="up", attempts=2, elapsed=pytest.approx(0.75), status=200, error=None),  # type: ignore[arg-type]
        CallRecord(upstream="up", attempts=3, elapsed=0.0, status=None, error="connection_refused"),
        CallRecord(upstream="up", attempts=1, elapsed=0.0, status=500, error=None),
    ]


def test_call_records_are_bounded(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    ctx = context(guard)

    driver.send_many(guard, Upstream(), MAX_RECORDS + 8)

    assert len(ctx.calls) == MAX_RECORDS


@pytest.mark.parametrize("debug", [False, True])
def test_a_middleware_records_calls_only_for_debug_modes_server_timing(
    driver: Driver, clock: FakeClock, debug: bool
) -> None:
    # Only debug mode's Server-Timing reads the records: without it, no call pays for one.
    guard = gg.Guard({"debug": debug, "upstreams": {"up": {"base_url": BASE_URL}}}, clock=clock)
    ctx = start(guard, "GET", "/orders/1", None, None)
    token = set_context(ctx)
    try:
        driver.send(guard, Upstream())
        with pytest.raises(gg.UpstreamStatusError):
            driver.send(guard, Upstream(status(500)))
    finally:
        reset_context(token)
    assert ctx.records is debug
    assert len(ctx.calls) == (2 if debug else 0)


# --- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_and_fails_fast(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)
    trip(driver, guard)
    handler = Upstream()

    with pytest.raises(gg.CircuitOpenError) as info:
        driver.send(guard, handler)

    error = info.value
    assert handler.calls == 0
    assert error.status == 503
    assert error.proxy_error == "destination_unavailable"
    assert error.upstream == "up"
    assert error.attempts == 0
    assert error.retry_after == pytest.approx(30.0)
    assert guard.bulkhead("up").in_flight == 0

    clock.advance(12.0)
    with pytest.raises(gg.CircuitOpenError) as info:
        driver.send(guard, handler)
    assert info.value.retry_after == pytest.approx(18.0)


def test_breaker_half_open_probes_close_it(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)  # half_open_calls = 2
    trip(driver, guard)
    clock.advance(30.0)
    assert guard.breaker("up").state is BreakerState.HALF_OPEN
    handler = Upstream()

    driver.send(guard, handler)
    assert guard.breaker("up").state is BreakerState.HALF_OPEN
    driver.send(guard, handler)

    assert handler.calls == 2
    assert guard.breaker("up").state is BreakerState.CLOSED


def test_breaker_failed_probe_reopens_it(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)
    trip(driver, guard)
    clock.advance(30.0)
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError):
        driver.send(guard, handler)

    assert handler.calls == 1
    assert guard.breaker("up").state is BreakerState.OPEN
    with pytest.raises(gg.CircuitOpenError):
        driver.send(guard, handler)
    assert handler.calls == 1


def failing_elsewhere(guard: gg.Guard, step: Step) -> Step:
    """``step``, after other calls' failures opened the breaker while this one ran (a
    call's own retried attempts do not count: the breaker judges calls)."""

    def opened(request: httpx.Request) -> httpx.Response:
        breaker = guard.breaker("up")
        while breaker.state is BreakerState.CLOSED:
            breaker.record_failure(0.1, breaker.admit())
        return step(request)

    return opened


def test_a_half_open_probe_is_not_retried(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, **{**TRIPPY, "retry": {"attempts": 3}})
    trip(driver, guard)  # four calls of three attempts each
    clock.advance(30.0)
    handler = Upstream(status(503))

    with pytest.raises(gg.UpstreamStatusError) as info:
        driver.send(guard, handler)

    assert (handler.calls, info.value.attempts) == (1, 1)
    assert guard.breaker("up").snapshot().probes_in_flight == 0


def test_breaker_opening_mid_call_stops_the_retries(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, breaker={"min_calls": 2, "window_size": 2})
    handler = Upstream(failing_elsewhere(guard, status(503)))

    with pytest.raises(gg.CircuitOpenError):
        driver.send(guard, handler)

    assert handler.calls == 1
    assert guard.bulkhead("up").in_flight == 0


def test_breaker_opening_mid_call_reports_the_attempts_made(
    driver: Driver, clock: FakeClock
) -> None:
    guard = make_guard(clock, breaker={"min_calls": 2, "window_size": 2})

    with pytest.raises(gg.CircuitOpenError) as info:
        driver.send(guard, Upstream(failing_elsewhere(guard, status(503))))

    assert info.value.attempts == 1


def test_breaker_admits_exactly_half_open_calls_probes_async(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)  # half_open_calls = 2
    trip(AsyncDriver(), guard)
    clock.advance(30.0)
    entered = 0
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal entered
        entered += 1
        await release.wait()
        return httpx.Response(200)

    async def main() -> list[httpx.Response | BaseException]:
        async with guard.async_client("up", transport=httpx.MockTransport(handler)) as client:
            tasks = [asyncio.ensure_future(client.get("/x")) for _ in range(5)]
            for _ in range(100):
                await asyncio.sleep(0)
                if entered == 2 and sum(task.done() for task in tasks) == 3:
                    break
            assert entered == 2
            assert guard.breaker("up").snapshot().probes_in_flight == 2
            release.set()
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(main(), WAIT))

    assert entered == 2
    rejected = [r for r in results if isinstance(r, gg.CircuitOpenError)]
    assert len(rejected) == 3
    assert all(r.retry_after == HALF_OPEN_RETRY_AFTER for r in rejected)
    assert sorted(r.status_code for r in results if isinstance(r, httpx.Response)) == [200, 200]
    assert guard.breaker("up").state is BreakerState.CLOSED


def test_breaker_admits_exactly_half_open_calls_probes_sync(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)  # half_open_calls = 2
    trip(SyncDriver(), guard)
    clock.advance(30.0)
    entered = threading.Semaphore(0)
    finished = threading.Semaphore(0)
    release = threading.Event()
    results: list[httpx.Response | BaseException] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        entered.release()
        release.wait(WAIT)
        return httpx.Response(200)

    def call(client: httpx.Client) -> None:
        try:
            result: httpx.Response | BaseException = client.get("/x")
        except gg.UpstreamError as exc:
            result = exc
        with lock:
            results.append(result)
        finished.release()

    with guard.client("up", transport=httpx.MockTransport(handler)) as client:
        threads = [threading.Thread(target=call, args=(client,)) for _ in range(5)]
        for thread in threads:
            thread.start()
        try:
            # Two probes reach the upstream; the other three are refused without it.
            for _ in range(3):
                assert finished.acquire(timeout=WAIT)
            assert entered.acquire(timeout=WAIT)
            assert entered.acquire(timeout=WAIT)
            assert not entered.acquire(blocking=False)
        finally:
            release.set()
            for thread in threads:
                thread.join(WAIT)

    rejected = [r for r in results if isinstance(r, gg.CircuitOpenError)]
    assert len(rejected) == 3
    assert all(r.retry_after == HALF_OPEN_RETRY_AFTER for r in rejected)
    assert sorted(r.status_code for r in results if isinstance(r, httpx.Response)) == [200, 200]
    assert guard.breaker("up").state is BreakerState.CLOSED


# --- retry budget ------------------------------------------------------------------------------


def test_retry_budget_caps_retries(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(
        clock, retry={"budget_ratio": 0.1, "budget_min_per_second": 0}, **NEVER_TRIPS
    )
    handler = Upstream(status(503))

    results = driver.send_many(guard, handler, 100)

    assert all(isinstance(r, gg.UpstreamStatusError) for r in results)
    assert 100 <= handler.calls <= 110
    assert guard.runtime("up").budget.counts() == (100, handler.calls - 100)


# --- bulkhead ------------------------------------------------------------------------------------

BULKHEAD = {"bulkhead": {"max_concurrent": 2, "max_wait": 0.0}}


def test_bulkhead_sheds_the_third_call_sync(clock: FakeClock) -> None:
    guard = make_guard(clock, **BULKHEAD)
    entered = threading.Semaphore(0)
    release = threading.Event()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        entered.release()
        release.wait(WAIT)
        return httpx.Response(200)

    results: list[int] = []
    with guard.client("up", transport=httpx.MockTransport(handler)) as client:
        threads = [
            threading.Thread(target=lambda: results.append(client.get("/x").status_code))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        try:
            assert entered.acquire(timeout=WAIT)
            assert entered.acquire(timeout=WAIT)
            assert guard.bulkhead("up").in_flight == 2
            with pytest.raises(gg.LoadShedError) as info:
                client.get("/x")
        finally:
            release.set()
            for thread in threads:
                thread.join(WAIT)

    assert calls == 2
    assert results == [200, 200]
    assert info.value.status == 503
    assert info.value.proxy_error == "connection_limit_reached"
    assert info.value.upstream == "up"
    assert info.value.attempts == 0
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert guard.bulkhead("up").in_flight == 0


def test_bulkhead_sheds_the_third_call_async(clock: FakeClock) -> None:
    guard = make_guard(clock, **BULKHEAD)
    calls = 0

    async def main() -> gg.LoadShedError:
        nonlocal calls
        entered = asyncio.Semaphore(0)
        release = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            entered.release()
            await release.wait()
            return httpx.Response(200)

        async with guard.async_client("up", transport=httpx.MockTransport(handler)) as client:
            holders = [asyncio.ensure_future(client.get("/x")) for _ in range(2)]
            await entered.acquire()
            await entered.acquire()
            assert guard.bulkhead("up").in_flight == 2
            with pytest.raises(gg.LoadShedError) as info:
                await client.get("/x")
            release.set()
            responses = await asyncio.gather(*holders)
        assert [r.status_code for r in responses] == [200, 200]
        return info.value

    error = asyncio.run(asyncio.wait_for(main(), WAIT))

    assert calls == 2
    assert error.status == 503
    assert error.proxy_error == "connection_limit_reached"
    assert error.attempts == 0
    assert guard.bulkhead("up").in_flight == 0


@pytest.mark.parametrize(
    "step",
    [
        OK,
        status(503),
        status(500),
        fail(httpx.ConnectError, "[Errno 111] Connection refused"),
        fail(httpx.ReadTimeout, "timed out"),
        fail(httpx.UnsupportedProtocol, "ftp"),
        broken_body(INCOMPLETE),
    ],
    ids=["ok", "503", "500", "connect", "read-timeout", "config", "broken-body"],
)
def test_bulkhead_slot_released_whatever_the_outcome(
    driver: Driver, clock: FakeClock, step: Step
) -> None:
    guard = make_guard(clock, **BULKHEAD)

    shed = []
    for _ in range(3):  # more calls than slots: a leaked slot would shed the last one
        try:
            driver.send(guard, Upstream(step))
        except gg.LoadShedError as exc:
            shed.append(exc)
        except gg.UpstreamError:
            pass

    assert shed == []
    assert guard.bulkhead("up").in_flight == 0


def test_bulkhead_statistics_count_the_transports_calls(driver: Driver, clock: FakeClock) -> None:
    # The transports take and give back the default (fail-fast) bulkhead's slots inline;
    # its statistics must still see every call, and every shed one.
    guard = make_guard(clock)
    for _ in range(5):
        driver.send(guard, Upstream(OK))
    snapshot = guard.bulkhead("up").snapshot()
    assert (snapshot.admitted, snapshot.released, snapshot.in_flight) == (5, 5, 0)

    bulkhead = guard.bulkhead("up")
    held = [bulkhead.try_acquire() for _ in range(bulkhead.max_concurrent)]
    assert all(held)
    with pytest.raises(gg.LoadShedError):
        driver.send(guard, Upstream(OK))
    for _ in held:
        bulkhead.release()
    snapshot = bulkhead.snapshot()
    assert (snapshot.rejected, snapshot.in_flight) == (1, 0)


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt / SystemExit raised while a thread is in a call."""


def test_interrupted_sync_call_gives_back_its_slots(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY, **BULKHEAD)
    trip(SyncDriver(), guard)
    clock.advance(30.0)

    def interrupted(request: httpx.Request) -> httpx.Response:
        raise Interrupt

    with pytest.raises(Interrupt):
        SyncDriver().send(guard, interrupted)

    snapshot = guard.breaker("up").snapshot()
    assert snapshot.probes_in_flight == 0
    assert snapshot.state is BreakerState.HALF_OPEN
    assert guard.bulkhead("up").in_flight == 0
    # Both probe slots are free again: two successful probes close the breaker.
    SyncDriver().send(guard, Upstream())
    SyncDriver().send(guard, Upstream())
    assert guard.breaker("up").state is BreakerState.CLOSED


def test_cancelled_async_call_gives_back_its_slots(clock: FakeClock) -> None:
    guard = make_guard(
        clock,
        retry={"attempts": 1},
        breaker={"min_calls": 4, "window_size": 4, "half_open_calls": 1},
        **BULKHEAD,
    )
    trip(AsyncDriver(), guard)
    clock.advance(30.0)

    async def main() -> None:
        entered = asyncio.Event()

        async def stuck(request: httpx.Request) -> httpx.Response:
            entered.set()
            await asyncio.Event().wait()  # never answers
            raise AssertionError("unreachable")

        async with guard.async_client("up", transport=httpx.MockTransport(stuck)) as client:
            task = asyncio.ensure_future(client.get("/x"))
            await entered.wait()
            assert guard.bulkhead("up").in_flight == 1
            assert guard.breaker("up").snapshot().probes_in_flight == 1
            with pytest.raises(gg.CircuitOpenError):  # the only probe slot is taken
                await client.get("/x")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(main(), WAIT))

    snapshot = guard.breaker("up").snapshot()
    assert guard.bulkhead("up").in_flight == 0
    assert snapshot.probes_in_flight == 0
    assert snapshot.state is BreakerState.HALF_OPEN
    # The probe slot was given back: the next call probes, and closes the breaker.
    AsyncDriver().send(guard, Upstream())
    assert guard.breaker("up").state is BreakerState.CLOSED


# --- response body failures ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "proxy_error"),
    [
        (INCOMPLETE, "http_response_incomplete"),
        ("malformed chunked encoding", "http_protocol_error"),
    ],
)
def test_body_failure_after_headers_of_a_streamed_response(
    driver: Driver, clock: FakeClock, message: str, proxy_error: str
) -> None:
    guard = make_guard(clock)
    handler = Upstream(broken_body(message), OK)

    with pytest.raises(gg.UpstreamProtocolError) as info:
        driver.stream(guard, handler)

    assert info.value.proxy_error == proxy_error
    assert info.value.status == 502
    assert info.value.upstream == "up"
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    # A caller streaming the body may have used part of it: it is not fetched again.
    assert handler.calls == 1
    assert guard.breaker("up").snapshot().failures == 1


def test_body_failure_is_recorded_in_the_context(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext]
) -> None:
    guard = make_guard(clock)
    ctx = context(guard)

    with pytest.raises(gg.UpstreamProtocolError):
        driver.send(guard, Upstream(broken_body(INCOMPLETE)))

    assert [call.error for call in ctx.calls][-1] == "http_response_incomplete"


@pytest.mark.parametrize("streamed", [False, True], ids=["read-whole", "streamed"])
def test_body_failure_counts_as_one_failed_call(
    driver: Driver, clock: FakeClock, streamed: bool
) -> None:
    guard = make_guard(clock)
    handler = Upstream(broken_body(INCOMPLETE))

    with pytest.raises(gg.UpstreamProtocolError) as info:
        (driver.stream if streamed else driver.send)(guard, handler)

    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)
    # Read whole, the body was retried within the call: 3 attempts, as the error says.
    assert info.value.attempts == handler.calls == (1 if streamed else 3)


def body_then(exc_type: type[httpx.TransportError], message: str) -> Step:
    """200 with headers promising 100 bytes, then ``exc_type`` after 7 of them."""

    def step(request: httpx.Request) -> httpx.Response:
        error = exc_type(message, request=request)
        return httpx.Response(
            200, headers={"content-length": "100"}, stream=ChunkStream([b"partial"], error)
        )

    return step


@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET", {}), ("PUT", {}), ("DELETE", {}), ("POST", {"Idempotency-Key": "order-1"})],
)
@pytest.mark.parametrize(
    "broken",
    [
        broken_body(INCOMPLETE),
        body_then(httpx.ReadError, "[Errno 104] Connection reset by peer"),
        body_then(httpx.ReadTimeout, "timed out"),
    ],
    ids=["truncated", "reset", "stalled"],
)
def test_body_failure_of_a_replayable_request_is_retried(
    driver: Driver, clock: FakeClock, method: str, headers: dict[str, str], broken: Step
) -> None:
    # Issue #15, defect 6: a body the caller reads whole is read within the attempt, so
    # one that breaks off is a failed attempt, retried like any other transport error.
    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(broken, OK)

    response = driver.send(guard, handler, method, headers=headers)

    assert response.content == b"hello"
    assert handler.calls == 2
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)  # judged by its last attempt
    assert guard.bulkhead("up").in_flight == 0


def test_body_that_keeps_stalling_fails_as_a_read_timeout(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(body_then(httpx.ReadTimeout, "timed out"))

    with pytest.raises(gg.UpstreamTimeout) as info:
        driver.send(guard, handler)

    assert (info.value.status, info.value.proxy_error) == (504, "connection_read_timeout")
    assert info.value.attempts == handler.calls == 3


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("POST", {"content": b"{}"}), ("PATCH", {"content": b"{}"})],
)
def test_body_failure_of_a_non_idempotent_request_is_never_sent_twice(
    driver: Driver, clock: FakeClock, method: str, kwargs: dict[str, Any]
) -> None:
    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(broken_body(INCOMPLETE), OK)

    with pytest.raises(gg.UpstreamProtocolError):
        driver.send(guard, handler, method, **kwargs)

    assert handler.calls == 1
    assert guard.breaker("up").snapshot().failures == 1


def test_body_failure_after_a_streamed_request_body_is_never_sent_twice(
    driver: Driver, clock: FakeClock
) -> None:
    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(broken_body(INCOMPLETE), OK)

    with pytest.raises(gg.UpstreamProtocolError):
        driver.send(guard, handler, "PUT", content=driver.body([b"a", b"b"]))

    assert handler.calls == 1


def test_body_of_unknown_length_is_left_to_the_caller(driver: Driver, clock: FakeClock) -> None:
    # No Content-Length: a server-sent event stream or a chunked download could be endless,
    # so it streams to the caller, who then owns its failures.
    def chunked(request: httpx.Request) -> httpx.Response:
        error = httpx.RemoteProtocolError("peer closed connection", request=request)
        return httpx.Response(200, stream=ChunkStream([b"data: 1\n\n"], error))

    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(chunked, OK)

    with pytest.raises(gg.UpstreamProtocolError):
        driver.send(guard, handler)

    assert handler.calls == 1


@pytest.mark.parametrize(("limit", "calls"), [(0, 1), (99, 1), (100, 2)])
def test_buffer_body_bytes_caps_the_bodies_read_within_the_attempt(
    driver: Driver, clock: FakeClock, limit: int, calls: int
) -> None:
    guard = make_guard(clock, retry={"attempts": 3, "buffer_body_bytes": limit})
    handler = Upstream(broken_body(INCOMPLETE), OK)  # Content-Length: 100

    try:
        driver.send(guard, handler)
    except gg.UpstreamProtocolError:
        assert calls == 1
    else:
        assert calls == 2

    assert handler.calls == calls


@pytest.mark.parametrize("length", ["21", None], ids=["known-length", "chunked"])
def test_client_stream_gets_the_body_as_it_comes(
    driver: Driver, clock: FakeClock, length: str | None
) -> None:
    # client.stream() is never read within the attempt, however small the body: the chunks
    # arrive one by one.
    chunks = [b"a" * 10, b"b" * 10, b"c"]
    headers = {"content-length": length} if length else {}

    def step(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, stream=ChunkStream(chunks))

    guard = make_guard(clock)

    assert driver.stream(guard, Upstream(step)) == chunks
    assert guard.breaker("up").snapshot().calls == 1


def test_send_with_stream_true_streams_a_body_of_unknown_length(
    driver: Driver, clock: FakeClock
) -> None:
    # What SDKs use for server-sent events: chunked, so it may never end, and it streams.
    chunks = [b"data: 1\n\n", b"data: 2\n\n"]

    def step(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=ChunkStream(chunks))

    guard = make_guard(clock)

    assert driver.stream(guard, Upstream(step), send=True) == chunks


def test_send_with_stream_true_has_a_small_body_read_and_retried_within_the_call(
    driver: Driver, clock: FakeClock
) -> None:
    # client.send(request, stream=True) (how SDKs call a client they are given) is not
    # marked as streaming: a body of known length within buffer_body_bytes is read within
    # the attempt, so one that breaks off is retried. The caller still gets every byte.
    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(broken_body(INCOMPLETE), OK)

    assert b"".join(driver.stream(guard, handler, send=True)) == b"hello"
    assert handler.calls == 2


def test_a_transport_on_the_callers_own_client_leaves_bodies_to_the_caller(
    clock: FakeClock,
) -> None:
    # Only guard.client() tells its transport that the caller reads the whole body.
    guard = make_guard(clock, retry={"attempts": 3})
    handler = Upstream(broken_body(INCOMPLETE), OK)
    transport = guard.transport("up", httpx.MockTransport(handler))

    with (
        httpx.Client(transport=transport, base_url=BASE_URL) as client,
        pytest.raises(gg.UpstreamProtocolError),
    ):
        client.get("/x")

    assert handler.calls == 1


def test_a_body_read_within_the_attempt_reaches_the_caller_decoded(
    driver: Driver, clock: FakeClock
) -> None:
    text = "hello " * 200
    raw = gzip.compress(text.encode())

    def step(request: httpx.Request) -> httpx.Response:
        headers = {"content-encoding": "gzip", "content-length": str(len(raw))}
        return httpx.Response(200, headers=headers, stream=ChunkStream([raw[:10], raw[10:]]))

    guard = make_guard(clock)
    response = driver.send(guard, Upstream(step))

    assert response.text == text
    assert response.is_closed
    assert response.elapsed.total_seconds() >= 0.0
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)


def corrupt_gzip(request: httpx.Request) -> httpx.Response:
    """200 whose body claims gzip but is not: httpx fails decoding it in the caller's read."""
    return httpx.Response(
        200, headers={"content-encoding": "gzip"}, stream=ChunkStream([b"not gzip at all"])
    )


def corrupt_gzip_with_length(request: httpx.Request) -> httpx.Response:
    """The same, with its Content-Length: read within the attempt, decoded by the caller."""
    body = b"not gzip at all"
    headers = {"content-encoding": "gzip", "content-length": str(len(body))}
    return httpx.Response(200, headers=headers, stream=ChunkStream([body]))


@pytest.mark.parametrize("step", [corrupt_gzip, corrupt_gzip_with_length])
def test_corrupt_content_encoding_counts_as_one_failed_call(
    driver: Driver, clock: FakeClock, context: Callable[..., RequestContext], step: Step
) -> None:
    guard = make_guard(clock)
    ctx = context(guard)
    handler = Upstream(step)

    with pytest.raises(httpx.DecodingError):
        driver.send(guard, handler)

    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)
    assert handler.calls == 1  # decoding the same bytes again would fail the same way
    assert [call.error for call in ctx.calls][-1] == "http_response_content_coding"


def test_half_open_probe_with_broken_body_reopens(driver: Driver, clock: FakeClock) -> None:
    guard = make_guard(
        clock,
        retry={"attempts": 1},
        breaker={"min_calls": 4, "window_size": 4, "half_open_calls": 1},
    )
    trip(driver, guard)
    clock.advance(30.0)

    with pytest.raises(gg.UpstreamProtocolError):
        driver.send(guard, Upstream(broken_body(INCOMPLETE)))

    assert guard.breaker("up").state is BreakerState.OPEN


# --- concurrency -----------------------------------------------------------------------------


class Flaky:
    """Deterministically flaky: every 5th request 503, every 7th refused, else 200."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.failures = 0

    def outcome(self) -> int:
        with self._lock:
            self.calls += 1
            n = self.calls
            failed = n % 5 == 0 or n % 7 == 0
            self.failures += failed
        return 503 if n % 5 == 0 else -1 if n % 7 == 0 else 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        code = self.outcome()
        if code < 0:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(code, content=b"ok" if code == 200 else b"")


def check_consistent(guard: gg.Guard, flaky: Flaky, calls: int, failed: int) -> None:
    bulkhead = guard.bulkhead("up")
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)
    snapshot = guard.breaker("up").snapshot()
    # Every call is in the window exactly once, by the outcome of its last attempt.
    assert snapshot.state is BreakerState.CLOSED
    assert (snapshot.calls, snapshot.failures) == (calls, failed)
    # Every retry was paid for from the budget, and led to exactly one more attempt.
    assert guard.runtime("up").budget.counts() == (calls, flaky.calls - calls)


def test_many_threads_share_one_client(clock: FakeClock) -> None:
    guard = make_guard(clock, bulkhead={"max_concurrent": 16, "max_wait": WAIT}, **NEVER_TRIPS)
    flaky = Flaky()
    threads, per_thread = 64, 25
    unexpected: list[BaseException] = []
    outcomes: list[int | str] = []
    lock = threading.Lock()

    def work(client: httpx.Client) -> None:
        for _ in range(per_thread):
            try:
                result: int | str = client.get("/x").status_code
            except (gg.UpstreamStatusError, gg.UpstreamConnectError) as exc:
                result = type(exc).__name__
            except BaseException as exc:
                with lock:
                    unexpected.append(exc)
                return
            with lock:
                outcomes.append(result)

    with guard.client("up", transport=httpx.MockTransport(flaky)) as client:
        workers = [threading.Thread(target=work, args=(client,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)

    assert unexpected == []
    assert len(outcomes) == threads * per_thread
    assert outcomes.count(200) > threads * per_thread // 2
    check_consistent(guard, flaky, threads * per_thread, len(outcomes) - outcomes.count(200))


def test_many_tasks_share_one_async_client(clock: FakeClock) -> None:
    guard = make_guard(clock, bulkhead={"max_concurrent": 250, "max_wait": WAIT}, **NEVER_TRIPS)
    flaky = Flaky()
    tasks = 1000

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)  # let the other tasks in, so calls really overlap
        return flaky(request)

    async def main() -> list[httpx.Response | BaseException]:
        async with guard.async_client("up", transport=httpx.MockTransport(handler)) as client:
            calls = [client.get("/x") for _ in range(tasks)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(main(), 30))

    unexpected = [
        r
        for r in results
        if isinstance(r, BaseException)
        and not isinstance(r, gg.UpstreamStatusError | gg.UpstreamConnectError)
    ]
    assert unexpected == []
    assert sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in results) > tasks // 2
    assert guard.bulkhead("up").snapshot().admitted == tasks
    failed = sum(isinstance(r, BaseException) for r in results)
    check_consistent(guard, flaky, tasks, failed)


def test_a_dropped_probe_body_finalised_under_the_breaker_lock_does_not_deadlock(
    clock: FakeClock,
) -> None:
    # Issue #15, defect 4: the garbage collector can finalise a streamed probe response on
    # a thread that holds the breaker's (non-reentrant) lock; the finaliser took it again.
    guard = make_guard(clock, **TRIPPY)
    trip(SyncDriver(), guard)
    clock.advance(30.0)
    breaker = guard.breaker("up")
    handler = Upstream(lambda request: httpx.Response(200, stream=ChunkStream([b"x"])))
    gc.disable()
    try:
        with guard.client("up", transport=httpx.MockTransport(handler)) as client:
            response = client.send(client.build_request("GET", "/x"), stream=True)
        assert breaker.snapshot().probes_in_flight == 1
        cycle: list[Any] = [response]
        cycle.append(cycle)  # only the cycle collector can free it now
        del response, cycle

        def collect_holding_the_lock() -> None:
            with breaker._lock:
                gc.collect()

        worker = threading.Thread(target=collect_holding_the_lock, daemon=True)
        worker.start()
        worker.join(WAIT)
        assert not worker.is_alive(), "the finaliser deadlocked on the breaker's lock"
    finally:
        gc.enable()
    # The slot came back: the next probe is admitted, the spell still judged by it.
    assert breaker.snapshot().probes_in_flight == 0
    driver_response = SyncDriver().send(guard, Upstream())
    assert driver_response.status_code == 200


# --- timing successes ------------------------------------------------------------------------


def slow_ok(clock: FakeClock, seconds: float) -> Step:
    def step(request: httpx.Request) -> httpx.Response:
        clock.now += seconds
        return httpx.Response(200, content=b"late")

    return step


@pytest.mark.parametrize(
    ("breaker", "listen", "slow"),
    [
        ({}, False, 0),  # slowness cannot open it: successes are not timed at all
        ({"slow_call_rate": 0.5}, False, 1),
        ({}, True, 1),  # a call listener is told every duration
    ],
    ids=["default", "slow-call-rate", "listener"],
)
def test_a_success_is_timed_only_when_its_duration_can_matter(
    driver: Driver, clock: FakeClock, breaker: dict[str, Any], listen: bool, slow: int
) -> None:
    guard = make_guard(clock, breaker={"slow_call_seconds": 1.0, **breaker})
    durations: list[float] = []
    if listen:
        guard.breaker("up").add_call_listener(lambda _b, _o, duration: durations.append(duration))

    response = driver.send(guard, Upstream(slow_ok(clock, 2.0)), "GET", "/x")

    assert response.status_code == 200
    assert guard.breaker("up").snapshot().slow == slow
    assert durations == ([2.0] if listen else [])


# --- wall-clock deadlines ----------------------------------------------------------------------


@pytest.mark.implementation
def test_httpx_own_transports_get_the_deadline_hook() -> None:
    # The slow-drip bound hooks httpcore's network backend through httpx's private _pool
    # (tests/test_e2e_deadlines.py shows what it buys): an httpx release that moves it must
    # fail here, not silently lose the bound.
    from gateway_guard import _httpx_deadlines

    guard = gg.Guard({"upstreams": {"up": {"base_url": BASE_URL}}})
    sync = httpx.HTTPTransport()
    guard.transport("up", sync)
    guard.transport("up", sync)  # shared by two guarded transports: wrapped once
    backend = sync._pool._network_backend
    assert isinstance(backend, _httpx_deadlines._Backend)
    assert not isinstance(backend._inner, _httpx_deadlines._Backend)
    async_inner = httpx.AsyncHTTPTransport()
    guard.async_transport("up", async_inner)
    assert isinstance(async_inner._pool._network_backend, _httpx_deadlines._AsyncBackend)
    sync.close()
