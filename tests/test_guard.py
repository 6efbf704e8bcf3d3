"""Guard: settings sources, lookups, clients sharing one runtime, state logging, protect()."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard import retry
from gateway_guard.breaker import BreakerState
from gateway_guard.testing import FakeClock

BASE_URL = "http://up.test"
OTHER_URL = "http://other.test"
WAIT = 5.0
# Trips on the 4th failure in a row; one attempt per call keeps the counts plain.
TRIPPY = {
    "retry": {"attempts": 1},
    "breaker": {"min_calls": 4, "window_size": 4, "open_seconds": 30.0, "half_open_calls": 2},
}


@pytest.fixture(autouse=True)
def _testing_mode() -> Iterator[None]:
    with retry.testing():
        yield


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_guard(clock: FakeClock, **up: Any) -> gg.Guard:
    """Upstreams ``up`` (keyword arguments are its settings) and ``other``."""
    return gg.Guard(
        {
            "upstreams": {
                "up": {"base_url": BASE_URL, **up},
                "other": {"base_url": OTHER_URL, **up},
            }
        },
        clock=clock,
    )


def answer(code: int) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code)

    return handler


def fail_times(client: httpx.Client, n: int) -> None:
    for _ in range(n):
        with pytest.raises(gg.UpstreamStatusError):
            client.get("/x")


class Failed(Exception):
    pass


class NotFound(Exception):
    pass


# --- settings sources and lookups -------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.startswith("GATEWAY_GUARD"):
            monkeypatch.delenv(var)
    return monkeypatch


def test_guard_none_reads_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "gateway_guard.toml"
    path.write_text(
        'service = "shop"\n'
        "[upstreams.payments]\n"
        'base_url = "http://payments.internal:8080"\n'
        "read_timeout = 3.0\n",
        encoding="utf-8",
    )
    clean_env.setenv("GATEWAY_GUARD_SETTINGS", str(path))
    clean_env.setenv("GATEWAY_GUARD__UPSTREAMS__PAYMENTS__CONNECT_TIMEOUT", "0.5")

    guard = gg.Guard(None)

    assert guard.settings.service == "shop"
    assert guard.upstreams == ("payments",)
    policy = guard.policy("payments")
    assert policy.base_url == "http://payments.internal:8080"
    assert (policy.connect_timeout, policy.read_timeout) == (0.5, 3.0)


def test_guard_without_settings_has_no_upstreams(clean_env: pytest.MonkeyPatch) -> None:
    guard = gg.Guard()

    assert guard.upstreams == ()
    with pytest.raises(KeyError, match="none configured"):
        guard.client("payments")


def test_guard_rejects_bad_settings() -> None:
    with pytest.raises(gg.SettingsError, match=r"upstreams\.up\.breaker\.failure_rate"):
        gg.Guard({"upstreams": {"up": {"breaker": {"failure_rate": 1.5}}}})


@pytest.mark.parametrize(
    "lookup",
    [
        lambda g: g.client("paymnets"),
        lambda g: g.async_client("paymnets"),
        lambda g: g.transport("paymnets"),
        lambda g: g.async_transport("paymnets"),
        lambda g: g.breaker("paymnets"),
        lambda g: g.bulkhead("paymnets"),
        lambda g: g.policy("paymnets"),
        lambda g: g.runtime("paymnets"),
        lambda g: g.protect("paymnets"),
    ],
    ids=[
        "client",
        "async_client",
        "transport",
        "async_transport",
        "breaker",
        "bulkhead",
        "policy",
        "runtime",
        "protect",
    ],
)
def test_unknown_upstream_names_the_configured_ones(
    clock: FakeClock, lookup: Callable[[gg.Guard], object]
) -> None:
    guard = make_guard(clock)

    with pytest.raises(KeyError) as info:
        lookup(guard)

    message = str(info.value)
    assert "'paymnets'" in message
    assert "other, up" in message


def test_lookups_return_the_shared_runtime(clock: FakeClock) -> None:
    guard = make_guard(clock)
    runtime = guard.runtime("up")

    assert guard.breaker("up") is runtime.breaker
    assert guard.bulkhead("up") is runtime.bulkhead
    assert guard.policy("up") is runtime.policy
    assert guard.breaker("other") is not runtime.breaker
    assert isinstance(guard.breaker("up").state, BreakerState)
    assert guard.breaker("up").state == "closed"


def test_two_guards_share_nothing(clock: FakeClock) -> None:
    first, second = make_guard(clock, **TRIPPY), make_guard(clock, **TRIPPY)

    with first.client("up", transport=httpx.MockTransport(answer(503))) as client:
        fail_times(client, 4)

    assert first.breaker("up").state is BreakerState.OPEN
    assert second.breaker("up").state is BreakerState.CLOSED


# --- clients and transports ---------------------------------------------------------------------


def test_client_is_new_each_time_and_shares_the_breaker(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503)

    first = guard.client("up", transport=httpx.MockTransport(handler))
    second = guard.client("up", transport=httpx.MockTransport(handler))
    assert first is not second
    with first:
        fail_times(first, 4)
    # The first client is closed; its failures still guard the second.
    with second, pytest.raises(gg.CircuitOpenError):
        second.get("/x")
    assert calls == 4


def test_upstreams_do_not_share_breakers(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)

    with guard.client("up", transport=httpx.MockTransport(answer(503))) as up:
        fail_times(up, 4)
    with guard.client("other", transport=httpx.MockTransport(answer(200))) as other:
        response = other.get("/x")

    assert response.status_code == 200
    assert guard.breaker("up").state is BreakerState.OPEN
    assert guard.breaker("other").state is BreakerState.CLOSED


def test_async_and_sync_clients_share_the_breaker(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)

    async def main() -> None:
        mock = httpx.MockTransport(answer(503))
        async with guard.async_client("up", transport=mock) as client:
            for _ in range(4):
                with pytest.raises(gg.UpstreamStatusError):
                    await client.get("/x")

    asyncio.run(main())

    with (
        guard.client("up", transport=httpx.MockTransport(answer(200))) as client,
        pytest.raises(gg.CircuitOpenError),
    ):
        client.get("/x")


def test_client_settings_and_overrides(clock: FakeClock) -> None:
    guard = make_guard(clock, connect_timeout=1.0, read_timeout=4.0)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    mock = httpx.MockTransport(handler)
    with guard.client("up", transport=mock, headers={"User-Agent": "shop/1"}) as client:
        assert str(client.base_url).rstrip("/") == BASE_URL
        assert client.timeout == httpx.Timeout(4.0, connect=1.0)
        client.get("/x")
    with guard.client("up", transport=mock, base_url="http://elsewhere.test") as client:
        client.get("/y")

    assert [str(r.url) for r in seen] == [f"{BASE_URL}/x", "http://elsewhere.test/y"]
    assert seen[0].headers["user-agent"] == "shop/1"


def test_transport_kwarg_is_wrapped_not_replaced(clock: FakeClock) -> None:
    guard = make_guard(clock)
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503)

    with (
        guard.client("up", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(gg.UpstreamStatusError),
    ):
        client.get("/x")

    assert calls == 3  # the user's transport was called, with the guard's retries around it


class ClosingTransport(httpx.MockTransport):
    def __init__(self) -> None:
        super().__init__(answer(200))
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def test_closing_a_client_closes_the_wrapped_transport(clock: FakeClock) -> None:
    guard = make_guard(clock)
    inner, async_inner = ClosingTransport(), ClosingTransport()

    with guard.client("up", transport=inner) as client:
        client.get("/x")

    async def main() -> None:
        async with guard.async_client("up", transport=async_inner) as client:
            await client.get("/x")

    asyncio.run(main())

    assert inner.closed
    assert async_inner.closed


def test_transport_in_a_plain_httpx_client(clock: FakeClock) -> None:
    guard = make_guard(clock)
    transport = guard.transport("up", httpx.MockTransport(answer(200)))

    with httpx.Client(transport=transport, base_url=BASE_URL) as client:
        assert client.get("/x").status_code == 200

    assert isinstance(transport, httpx.BaseTransport)
    assert isinstance(guard.async_transport("up"), httpx.AsyncBaseTransport)
    assert guard.breaker("up").snapshot().calls == 1


# --- state change logging ---------------------------------------------------------------------


def test_breaker_transitions_are_logged_once_each(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    guard = make_guard(clock, **TRIPPY)  # half_open_calls = 2

    with guard.client("up", transport=httpx.MockTransport(answer(503))) as client:
        fail_times(client, 4)
        for _ in range(5):  # rejected calls log nothing
            with pytest.raises(gg.CircuitOpenError):
                client.get("/x")
    clock.advance(30.0)
    with guard.client("up", transport=httpx.MockTransport(answer(200))) as client:
        for _ in range(4):
            client.get("/x")

    transitions = [
        (r.levelno, r.breaker_from, r.breaker_to, r.upstream)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "gateway_guard"
    ]
    assert transitions == [
        (logging.WARNING, "closed", "open", "up"),
        (logging.INFO, "open", "half_open", "up"),
        (logging.INFO, "half_open", "closed", "up"),
    ]
    assert "circuit breaker for upstream up: closed -> open" in caplog.text


def test_manual_breaker_changes_are_logged(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    guard = make_guard(clock)

    guard.breaker("up").force_open()
    guard.breaker("up").force_open()  # no change, no line
    guard.breaker("up").reset()

    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "circuit breaker for upstream up: closed -> forced_open"),
        (logging.INFO, "circuit breaker for upstream up: forced_open -> closed"),
    ]


# --- protect() ----------------------------------------------------------------------------------


def counts(guard: gg.Guard) -> tuple[int, int]:
    snapshot = guard.breaker("up").snapshot()
    return snapshot.calls, snapshot.failures


def test_protect_sync_counts_outcomes(clock: FakeClock) -> None:
    guard = make_guard(clock)

    @guard.protect("up", ignore=NotFound)
    def lookup(key: str) -> str:
        """Look a key up."""
        if key == "boom":
            raise Failed(key)
        if key == "missing":
            raise NotFound(key)
        return key.upper()

    assert lookup.__name__ == "lookup"
    assert lookup.__doc__ == "Look a key up."
    assert lookup("a") == "A"
    assert counts(guard) == (1, 0)
    with pytest.raises(Failed):
        lookup("boom")
    assert counts(guard) == (2, 1)
    with pytest.raises(NotFound):
        lookup("missing")
    assert counts(guard) == (3, 1)  # an ignored exception is a success
    assert guard.bulkhead("up").in_flight == 0


def test_protect_async_counts_outcomes(clock: FakeClock) -> None:
    guard = make_guard(clock)

    @guard.protect("up", ignore=(NotFound,))
    async def lookup(key: str) -> str:
        await asyncio.sleep(0)
        if key == "boom":
            raise Failed(key)
        if key == "missing":
            raise NotFound(key)
        return key.upper()

    async def main() -> None:
        assert await lookup("a") == "A"
        with pytest.raises(Failed):
            await lookup("boom")
        with pytest.raises(NotFound):
            await lookup("missing")

    assert asyncio.iscoroutinefunction(lookup)
    asyncio.run(main())
    assert counts(guard) == (3, 1)
    assert guard.bulkhead("up").in_flight == 0


def test_protect_failure_narrows_what_counts(clock: FakeClock) -> None:
    guard = make_guard(clock)

    @guard.protect("up", failure=ConnectionError)
    def call(exc: Exception) -> None:
        raise exc

    with pytest.raises(ConnectionRefusedError):
        call(ConnectionRefusedError())
    with pytest.raises(ValueError):
        call(ValueError())  # not a failure of the upstream: counts as nothing

    assert counts(guard) == (1, 1)


def test_protect_sync_cancellation_counts_as_neither(clock: FakeClock) -> None:
    guard = make_guard(clock)

    @guard.protect("up")
    def call() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        call()

    assert counts(guard) == (0, 0)
    assert guard.bulkhead("up").in_flight == 0


def test_protect_async_cancellation_counts_as_neither(clock: FakeClock) -> None:
    guard = make_guard(clock, breaker={"min_calls": 4, "window_size": 4, "half_open_calls": 1})
    entered = 0

    @guard.protect("up")
    async def call(gate: asyncio.Event) -> str:
        nonlocal entered
        entered += 1
        await gate.wait()
        return "ok"

    @guard.protect("up")
    async def broken() -> None:
        raise Failed

    async def main() -> None:
        for _ in range(4):
            with pytest.raises(Failed):
                await broken()
        assert guard.breaker("up").state is BreakerState.OPEN
        clock.advance(30.0)
        task = asyncio.ensure_future(call(asyncio.Event()))
        await asyncio.sleep(0)
        assert entered == 1
        assert guard.breaker("up").snapshot().probes_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert guard.bulkhead("up").in_flight == 0
        assert guard.breaker("up").snapshot().probes_in_flight == 0
        # The probe slot was given back: the next call probes, and closes the breaker.
        gate = asyncio.Event()
        gate.set()
        assert await call(gate) == "ok"

    asyncio.run(asyncio.wait_for(main(), WAIT))
    assert guard.breaker("up").state is BreakerState.CLOSED


def test_protect_open_breaker_does_not_call(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)
    calls = 0

    @guard.protect("up")
    def sync_call() -> None:
        nonlocal calls
        calls += 1
        raise Failed

    @guard.protect("up")
    async def async_call() -> None:
        nonlocal calls
        calls += 1

    for _ in range(4):
        with pytest.raises(Failed):
            sync_call()
    assert calls == 4

    with pytest.raises(gg.CircuitOpenError) as info:
        sync_call()
    with pytest.raises(gg.CircuitOpenError):
        asyncio.run(async_call())

    assert calls == 4
    assert info.value.status == 503
    assert info.value.retry_after == pytest.approx(30.0)
    assert guard.bulkhead("up").in_flight == 0


def test_protect_shares_the_breaker_with_clients(clock: FakeClock) -> None:
    guard = make_guard(clock, **TRIPPY)

    @guard.protect("up")
    def call() -> None:
        raise Failed

    for _ in range(4):
        with pytest.raises(Failed):
            call()

    with (
        guard.client("up", transport=httpx.MockTransport(answer(200))) as client,
        pytest.raises(gg.CircuitOpenError),
    ):
        client.get("/x")


def test_protect_sync_applies_the_bulkhead(clock: FakeClock) -> None:
    guard = make_guard(clock, bulkhead={"max_concurrent": 1, "max_wait": 0.0})

    @guard.protect("up")
    def outer() -> None:
        assert guard.bulkhead("up").in_flight == 1
        inner()

    @guard.protect("up")
    def inner() -> None:
        raise AssertionError("admitted past a full bulkhead")

    with pytest.raises(gg.LoadShedError) as info:
        outer()

    assert info.value.proxy_error == "connection_limit_reached"
    assert guard.bulkhead("up").in_flight == 0
    # Being shed is no news about the upstream, even when it propagates through outer.
    assert counts(guard) == (0, 0)


def test_protect_async_applies_the_bulkhead(clock: FakeClock) -> None:
    guard = make_guard(clock, bulkhead={"max_concurrent": 1, "max_wait": 0.0})
    inner_calls = 0

    @guard.protect("up")
    async def call(gate: asyncio.Event) -> None:
        nonlocal inner_calls
        inner_calls += 1
        await gate.wait()

    async def main() -> None:
        gate = asyncio.Event()
        holder = asyncio.ensure_future(call(gate))
        await asyncio.sleep(0)
        with pytest.raises(gg.LoadShedError):
            await call(gate)
        gate.set()
        await holder

    asyncio.run(asyncio.wait_for(main(), WAIT))
    assert inner_calls == 1
    assert guard.bulkhead("up").in_flight == 0


@pytest.mark.implementation
def test_client_connection_options_reach_the_inner_transport() -> None:
    # httpx ignores verify/limits/... when a transport is given; the guard moves them
    # onto the inner transport it builds instead of dropping them silently.
    guard = gg.Guard({"upstreams": {"up": {"base_url": "https://up.test"}}})
    limits = httpx.Limits(max_connections=3)
    with guard.client("up", verify=False, limits=limits) as client:
        inner = client._transport._inner  # type: ignore[attr-defined]
        assert isinstance(inner, httpx.HTTPTransport)
        pool = inner._pool
        assert pool._max_connections == 3
        assert pool._ssl_context.verify_mode.name == "CERT_NONE"


@pytest.mark.implementation
def test_clients_share_one_ssl_context() -> None:
    guard = gg.Guard({"upstreams": {"up": {"base_url": "https://up.test"}}})
    with guard.client("up") as a, guard.client("up") as b:
        ctx_a = a._transport._inner._pool._ssl_context  # type: ignore[attr-defined]
        ctx_b = b._transport._inner._pool._ssl_context  # type: ignore[attr-defined]
        assert ctx_a is ctx_b
