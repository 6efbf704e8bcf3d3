"""GatewayGuardMiddleware in-process: hand-written scope, receive and send, no server.

What every adapter does (request ids, error pages, shedding, re-branding, streaming) is
asserted in test_adapter_contract.py; here is what is ASGI's own: scopes that pass
through, header shapes, asyncio concurrency and cancellation, Starlette's nesting, logging.

Every wait is bounded by ``WAIT``: a bug fails the test instead of hanging it. Concurrency
tests run real asyncio tasks against the real limiter; nothing is mocked but the network.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from types import SimpleNamespace
from typing import Any

import http_sf
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import gateway_guard as gg
from gateway_guard.inbound import _errors as inbound
from gateway_guard.testing import FakeClock

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

WAIT = 5.0
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
UPSTREAM_URL = "http://up.test"


# --- harness ------------------------------------------------------------------------------


def make_guard(clock: Callable[[], float] | None = None, **settings: Any) -> gg.Guard:
    """A Guard for service ``shop`` with upstream ``up``; keywords are top-level settings."""
    base: dict[str, Any] = {
        "service": "shop",
        "upstreams": {"up": {"base_url": UPSTREAM_URL}},
    }
    base.update(settings)
    if clock is None:
        return gg.Guard(base)
    return gg.Guard(base, clock=clock)


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    query: bytes = b"",
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": query,
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def receiver() -> Receive:
    """The request body once, then a disconnect: never blocks."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


class Recorder:
    """An ASGI ``send`` that records every message it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def starts(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.start"]

    @property
    def start(self) -> Message:
        (start,) = self.starts
        return start

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def header_list(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.start["headers"]]

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.header_list}

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.header_list if k.lower() == name]

    @property
    def bodies(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.bodies)

    @property
    def complete(self) -> bool:
        bodies = self.bodies
        return bool(bodies) and not bodies[-1].get("more_body", False)


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(WAIT):
            return await coro

    return asyncio.run(bounded())


def call(mw: App, scope: Scope | None = None) -> Recorder:
    send = Recorder()
    run(mw(scope if scope is not None else http_scope(), receiver(), send))
    return send


async def respond(
    send: Send,
    status: int = 200,
    body: bytes = b"hello",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": headers if headers is not None else [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def responding(status: int = 200, body: bytes = b"hello") -> App:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, status, body)

    return app


def raising(exc: BaseException) -> App:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def proxy_status(value: str) -> tuple[str, dict[str, Any]]:
    """One Proxy-Status member, parsed as RFC 8941 says: (member, params); tokens as str."""
    parsed: Any = http_sf.parse(value.encode("ascii"), tltype="list")
    [(item, params)] = parsed
    return str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by the caller's timeout)."""
    while not predicate():
        await asyncio.sleep(0.001)


# --- scope guard ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_non_http_scopes_pass_through_untouched(kind: str) -> None:
    # A route whose dependency is down and a saturated limiter: neither may touch a
    # websocket or the lifespan protocol.
    guard = make_guard(
        routes=[{"path": "/ws", "depends_on": ["up"]}],
        shed={"max_concurrent": 1, "max_queue": 0},
    )
    guard.breaker("up").force_open()
    guard.shedding.app.acquire()
    seen: list[tuple[Scope, Receive, Send, gg.RequestContext | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send, gg.current_context()))
        await send({"type": f"{kind}.custom", "headers": [(b"x-app", b"1")]})

    scope: Scope = {"type": kind, "asgi": {"version": "3.0"}}
    if kind == "websocket":
        scope.update(path="/ws", headers=[(b"x-request-id", b"abc")], query_string=b"")
    original = copy.deepcopy(scope)
    receive, send = receiver(), Recorder()
    run(gg.GatewayGuardMiddleware(app, guard=guard)(scope, receive, send))

    [(got_scope, got_receive, got_send, ctx)] = seen
    assert got_scope is scope and scope == original
    assert got_receive is receive and got_send is send  # not even wrapped
    assert ctx is None
    assert send.messages == [{"type": f"{kind}.custom", "headers": [(b"x-app", b"1")]}]
    assert guard.shedding.app.in_flight == 1  # nothing taken, nothing released


# --- request ids ----------------------------------------------------------------------------


# The other kinds of response (and their one id) are in test_adapter_contract.py.
def _asgi_header_shapes() -> dict[str, tuple[App, int]]:
    async def tuple_headers(scope: Scope, receive: Receive, send: Send) -> None:
        # ASGI allows any iterable of pairs: the id must be added to a tuple too.
        await send({"type": "http.response.start", "status": 200, "headers": ((b"x-app", b"1"),)})
        await send({"type": "http.response.body", "body": b"ok"})

    async def no_headers(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    return {"tuple headers": (tuple_headers, 200), "no headers": (no_headers, 204)}


@pytest.mark.parametrize(
    ("app", "status"), _asgi_header_shapes().values(), ids=_asgi_header_shapes().keys()
)
def test_every_shape_of_headers_gets_exactly_one_request_id(app: App, status: int) -> None:
    send = call(
        gg.GatewayGuardMiddleware(app, guard=make_guard()),
        http_scope(headers=[(b"x-request-id", b"trace-me")]),
    )
    assert send.status == status
    assert send.all("x-request-id") == ["trace-me"]
    assert len(send.starts) == 1


def test_the_apps_headers_list_is_not_mutated() -> None:
    shared = [(b"content-type", b"text/plain")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": shared})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = gg.GatewayGuardMiddleware(app, guard=make_guard())
    call(mw, http_scope(headers=[(b"x-request-id", b"alice-request")]))
    bob = call(mw, http_scope(headers=[(b"x-request-id", b"bob-request")]))
    assert bob.all("x-request-id") == ["bob-request"]
    assert shared == [(b"content-type", b"text/plain")]


# --- current_guard ------------------------------------------------------------------------


def test_current_guard_inside_the_app_and_lookup_error_outside() -> None:
    guard = make_guard()
    seen: list[gg.Guard] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(gg.current_guard())
        await respond(send)

    with pytest.raises(LookupError, match="outside a request"):
        gg.current_guard()
    call(gg.GatewayGuardMiddleware(app, guard=guard))
    assert seen == [guard]
    with pytest.raises(LookupError):
        gg.current_guard()


def test_context_is_reset_even_when_the_app_raises() -> None:
    async def main() -> None:
        mw = gg.GatewayGuardMiddleware(raising(ValueError("bug")), guard=make_guard())
        with pytest.raises(ValueError, match="bug"):
            await mw(http_scope(), receiver(), Recorder())
        assert gg.current_context() is None

    run(main())


# --- upstream errors ------------------------------------------------------------------------


def test_repeated_accept_lines_are_combined() -> None:
    mw = gg.GatewayGuardMiddleware(raising(gg.UpstreamTimeout("x")), guard=make_guard())
    send = call(
        mw, http_scope(headers=[(b"accept", b"application/json"), (b"accept", b"text/*;q=0.1")])
    )
    assert send.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("not ours"),
        KeyError("k"),
        httpx.HTTPStatusError(
            "404", request=httpx.Request("GET", "http://x"), response=httpx.Response(404)
        ),
    ],
    ids=["ValueError", "KeyError", "HTTPStatusError"],
)
def test_non_upstream_exception_propagates_unchanged(exc: Exception) -> None:
    guard = make_guard()
    send = Recorder()
    mw = gg.GatewayGuardMiddleware(raising(exc), guard=guard)
    with pytest.raises(type(exc)) as info:
        run(mw(http_scope(), receiver(), send))
    assert info.value is exc
    assert send.messages == []
    assert guard.shedding.app.in_flight == 0


def test_error_after_the_response_started_aborts_the_body_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    guard = make_guard()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part one", "more_body": True})
        raise gg.UpstreamProtocolError("cut", proxy_error="connection_terminated", upstream="up")

    send = call(gg.GatewayGuardMiddleware(app, guard=guard))  # returns: no exception

    assert [m["type"] for m in send.messages] == ["http.response.start", "http.response.body"]
    assert send.status == 200
    assert send.bodies[-1]["more_body"] is True  # left unfinished: the server drops it
    records = [r for r in caplog.records if r.name == "gateway_guard"]
    assert len(records) == 1
    assert records[0].response_started is True  # type: ignore[attr-defined]
    assert "after the response started" in records[0].getMessage()
    assert guard.shedding.app.in_flight == 0


# --- depends_on ---------------------------------------------------------------------------


def _called_app() -> tuple[App, list[str]]:
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        await respond(send)

    return app, calls


def test_depends_on_retry_after_counts_down_and_half_open_lets_the_request_through() -> None:
    clock = FakeClock()
    guard = make_guard(
        clock,
        upstreams={
            "up": {
                "base_url": UPSTREAM_URL,
                "breaker": {"min_calls": 1, "window_size": 1, "open_seconds": 10.0},
            }
        },
        routes=[{"path": "/pay", "depends_on": ["up"]}],
    )
    breaker = guard.breaker("up")
    breaker.record_failure(0.1, breaker.admit())
    assert breaker.snapshot().state is gg.BreakerState.OPEN
    app, calls = _called_app()
    mw = gg.GatewayGuardMiddleware(app, guard=guard)

    assert call(mw, http_scope("/pay")).headers["retry-after"] == "10"
    clock.now += 4.0
    assert call(mw, http_scope("/pay")).headers["retry-after"] == "6"
    assert calls == []

    clock.now += 6.0
    assert breaker.state is gg.BreakerState.HALF_OPEN
    assert call(mw, http_scope("/pay")).status == 200
    assert calls == ["/pay"]


# --- shedding -------------------------------------------------------------------------------


def test_shedding_admits_max_concurrent_and_answers_the_rest_503_at_once() -> None:
    guard = make_guard(shed={"max_concurrent": 4, "max_queue": 0})

    async def main() -> None:
        release = asyncio.Event()
        admitted: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] != "/healthz":
                admitted.append(scope["path"])
                await release.wait()
            await respond(send)

        mw = gg.GatewayGuardMiddleware(app, guard=guard)
        sends = [Recorder() for _ in range(20)]
        tasks = [
            asyncio.create_task(mw(http_scope(f"/work/{i}"), receiver(), send))
            for i, send in enumerate(sends)
        ]
        await wait_until(lambda: sum(t.done() for t in tasks) >= 16)

        # All 16 answered while the 4 admitted are still waiting for the event.
        assert not release.is_set()
        assert len(admitted) == 4
        shed = [s for s, t in zip(sends, tasks, strict=True) if t.done()]
        assert len(shed) == 16
        for send in shed:
            assert send.status == 503
            assert proxy_status(send.headers["proxy-status"]) == (
                "shop",
                {"error": "connection_limit_reached"},
            )
            assert int(send.headers["retry-after"]) >= 1
            assert GENERATED_ID.fullmatch(send.headers["x-request-id"])
        assert guard.shedding.app.in_flight == 4

        health = Recorder()
        await mw(http_scope("/healthz"), receiver(), health)
        assert health.status == 200

        release.set()
        await asyncio.gather(*tasks)
        assert sorted(s.status for s in sends) == [200] * 4 + [503] * 16
        assert guard.shedding.app.in_flight == 0

    run(main())


def test_queued_critical_requests_get_slots_before_sheddable_ones() -> None:
    guard = make_guard(
        shed={"max_concurrent": 1, "max_queue": 10, "queue_timeout": WAIT},
        routes=[
            {"path": "/critical/{n}", "priority": "critical"},
            {"path": "/cheap/{n}", "priority": "sheddable"},
        ],
    )
    limiter = guard.shedding.app

    def queued_is(n: int) -> Callable[[], bool]:
        return lambda: limiter.queued == n

    async def main() -> None:
        release = asyncio.Event()
        order: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            order.append(scope["path"])
            if scope["path"] == "/hold":
                await release.wait()
            await respond(send)

        mw = gg.GatewayGuardMiddleware(app, guard=guard)
        tasks = [asyncio.create_task(mw(http_scope("/hold"), receiver(), Recorder()))]
        await wait_until(lambda: order == ["/hold"])
        for expected, path in enumerate(
            ("/cheap/1", "/cheap/2", "/normal", "/critical/1", "/critical/2"), start=1
        ):
            tasks.append(asyncio.create_task(mw(http_scope(path), receiver(), Recorder())))
            await wait_until(queued_is(expected))
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["/hold", "/critical/1", "/critical/2", "/normal", "/cheap/1", "/cheap/2"]

    run(main())


def test_full_queue_evicts_a_sheddable_waiter_for_a_critical_arrival() -> None:
    guard = make_guard(
        shed={"max_concurrent": 1, "max_queue": 1, "queue_timeout": WAIT},
        routes=[
            {"path": "/critical", "priority": "critical"},
            {"path": "/cheap", "priority": "sheddable"},
        ],
    )

    async def main() -> None:
        release = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/hold":
                await release.wait()
            await respond(send)

        mw = gg.GatewayGuardMiddleware(app, guard=guard)
        hold, cheap, critical = Recorder(), Recorder(), Recorder()
        tasks = [asyncio.create_task(mw(http_scope("/hold"), receiver(), hold))]
        await wait_until(lambda: guard.shedding.app.in_flight == 1)
        tasks.append(asyncio.create_task(mw(http_scope("/cheap"), receiver(), cheap)))
        await wait_until(lambda: guard.shedding.app.queued == 1)
        tasks.append(asyncio.create_task(mw(http_scope("/critical"), receiver(), critical)))
        await wait_until(lambda: bool(cheap.messages))
        assert cheap.status == 503  # evicted at once, not after the queue timeout
        assert not critical.messages
        release.set()
        await asyncio.gather(*tasks)
        assert (hold.status, critical.status) == (200, 200)

    run(main())


def test_a_route_with_its_own_limit_is_shed_alone() -> None:
    guard = make_guard(
        shed={"max_concurrent": 10, "max_queue": 0},
        routes=[{"path": "/search", "shed": {"max_concurrent": 1, "max_queue": 0}}],
    )

    async def main() -> None:
        release = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/search":
                await release.wait()
            await respond(send)

        mw = gg.GatewayGuardMiddleware(app, guard=guard)
        first = asyncio.create_task(mw(http_scope("/search"), receiver(), Recorder()))
        await wait_until(lambda: guard.shedding.app.in_flight == 1)
        second, other = Recorder(), Recorder()
        await mw(http_scope("/search"), receiver(), second)
        await mw(http_scope("/other"), receiver(), other)
        assert (second.status, other.status) == (503, 200)
        assert proxy_status(second.headers["proxy-status"])[1] == {
            "error": "connection_limit_reached"
        }
        release.set()
        await first
        assert guard.shedding.app.in_flight == 0
        # The route's slot came back too: the next /search is admitted.
        third = Recorder()
        await mw(http_scope("/search"), receiver(), third)
        assert third.status == 200

    run(main())


def test_cancelled_requests_give_their_slot_and_queue_place_back() -> None:
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 5, "queue_timeout": WAIT})
    limiter = guard.shedding.app

    async def main() -> None:
        never = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await never.wait()

        mw = gg.GatewayGuardMiddleware(app, guard=guard)
        running = asyncio.create_task(mw(http_scope(), receiver(), Recorder()))
        await wait_until(lambda: limiter.in_flight == 1)
        queued = asyncio.create_task(mw(http_scope(), receiver(), Recorder()))
        await wait_until(lambda: limiter.queued == 1)
        queued.cancel()  # the client went away while waiting
        running.cancel()  # ... and while the app was running
        for task in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert (limiter.in_flight, limiter.queued) == (0, 0)

    run(main())


# --- construction ---------------------------------------------------------------------------


def test_guard_or_settings_but_not_both() -> None:
    guard = make_guard()
    assert gg.GatewayGuardMiddleware(responding(), guard=guard).guard is guard
    built = gg.GatewayGuardMiddleware(responding(), settings={"service": "other"})
    assert built.guard.settings.service == "other"
    with pytest.raises(TypeError, match="not both"):
        gg.GatewayGuardMiddleware(responding(), guard=guard, settings={"service": "x"})


def test_invalid_settings_fail_at_construction() -> None:
    with pytest.raises(gg.SettingsError, match="shed.max_concurrent"):
        gg.GatewayGuardMiddleware(responding(), settings={"shed": {"max_concurrent": -1}})


# --- Starlette: inside its ServerErrorMiddleware, or outside it -----------------------------


@pytest.mark.implementation
def test_add_middleware_inside_starlette_versus_wrapping_from_outside(
    caplog: pytest.LogCaptureFixture, fresh_throttle: FakeClock
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    guard = make_guard()
    error = gg.UpstreamConnectError("refused", upstream="up")

    async def endpoint(request: Request) -> PlainTextResponse:
        raise error

    def starlette() -> Starlette:
        return Starlette(routes=[Route("/", endpoint)])

    # Right: add_middleware puts us inside Starlette's ServerErrorMiddleware.
    inside = starlette()
    inside.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    send = call(inside)
    assert send.status == 502
    assert proxy_status(send.headers["proxy-status"])[1] == {"error": "connection_refused"}

    # A sync endpoint runs in Starlette's thread pool: the context follows it there.
    def sync_endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(gg.current_guard().settings.service)

    threaded = Starlette(routes=[Route("/", sync_endpoint)])
    threaded.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    send = call(threaded)
    assert (send.status, send.body) == (200, b"shop")

    # A bare ASGI app wrapped from the outside works the same: nothing answers before us.
    send = call(gg.GatewayGuardMiddleware(raising(error), guard=guard))
    assert send.status == 502

    # Wrong: wrapping a Starlette app from the outside puts Starlette's 500 handler inside
    # ours. It sends its own 500 and re-raises; by then the response has started, so all we
    # can do is log. The visitor gets Starlette's plain 500, not a 502 page.
    caplog.clear()
    fresh_throttle.now += 2.0  # past the log throttle of the errors above
    outside = gg.GatewayGuardMiddleware(starlette(), guard=guard)
    send = call(outside)
    assert send.status == 500
    assert "proxy-status" not in send.headers
    assert send.all("x-request-id")  # still tagged
    [record] = [r for r in caplog.records if r.name == "gateway_guard"]
    assert record.response_started is True  # type: ignore[attr-defined]


# --- logging --------------------------------------------------------------------------------


@pytest.fixture
def fresh_throttle(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A throttle of our own (the module's is shared by every test) on a fake clock."""
    clock = FakeClock()
    monkeypatch.setattr(inbound, "_throttle", inbound._Throttle())
    monkeypatch.setattr(inbound, "time", SimpleNamespace(monotonic=clock))
    return clock


@pytest.mark.implementation
def test_one_log_record_per_gateway_error_with_fields(
    caplog: pytest.LogCaptureFixture, fresh_throttle: FakeClock
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    guard = make_guard(routes=[{"path": "/orders/{id}", "name": "orders"}])
    error = gg.UpstreamTimeout(
        "deadline", proxy_error="connection_read_timeout", upstream="up", attempts=3, elapsed=0.9
    )
    mw = gg.GatewayGuardMiddleware(raising(error), guard=guard)
    for _ in range(3):  # a second apart: each one is logged
        call(mw, http_scope("/orders/7", headers=[(b"x-request-id", b"log-me")]))
        fresh_throttle.now += 1.1

    records = [r for r in caplog.records if r.name == "gateway_guard"]
    assert len(records) == 3
    record = records[0]
    # An upstream failing is expected: one WARNING line, no traceback (#14).
    assert record.levelno == logging.WARNING
    fields = {
        k: getattr(record, k)
        for k in ("request_id", "route", "upstream", "proxy_error", "status", "attempts")
    }
    assert fields == {
        "request_id": "log-me",
        "route": "orders",
        "upstream": "up",
        "proxy_error": "connection_read_timeout",
        "status": 504,
        "attempts": 3,
    }
    assert record.elapsed == pytest.approx(0.9)  # type: ignore[attr-defined]
    assert record.exc_info is None


@pytest.mark.implementation
def test_repeated_failures_within_a_second_are_throttled_too(
    caplog: pytest.LogCaptureFixture, fresh_throttle: FakeClock
) -> None:
    # An outage before the breaker opens is thousands of 502/504s a second, each with a
    # long exception chain: one line per second per upstream and type, with a count.
    caplog.set_level(logging.INFO, logger="gateway_guard")
    error = gg.UpstreamConnectError("refused", upstream="up")
    mw = gg.GatewayGuardMiddleware(raising(error), guard=make_guard())
    for _ in range(5):
        call(mw)
    assert len([r for r in caplog.records if r.name == "gateway_guard"]) == 1
    fresh_throttle.now += 1.5
    call(mw)
    last = [r for r in caplog.records if r.name == "gateway_guard"][-1]
    assert last.suppressed == 4  # type: ignore[attr-defined]


@pytest.mark.implementation
def test_repeated_503s_within_a_second_are_throttled(
    caplog: pytest.LogCaptureFixture, fresh_throttle: FakeClock
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    mw = gg.GatewayGuardMiddleware(
        raising(gg.CircuitOpenError("open", upstream="up", retry_after=3.0)), guard=make_guard()
    )
    for _ in range(5):
        assert call(mw).status == 503
        fresh_throttle.now += 0.1
    [first] = [r for r in caplog.records if r.name == "gateway_guard"]
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert first.suppressed == 0  # type: ignore[attr-defined]

    caplog.clear()
    fresh_throttle.now += 1.0
    assert call(mw).status == 503
    [later] = [r for r in caplog.records if r.name == "gateway_guard"]
    assert later.suppressed == 4  # type: ignore[attr-defined]
    assert "+4 like it" in later.getMessage()
