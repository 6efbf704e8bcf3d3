"""The call core (gateway_guard._call), driven without any HTTP client.

Every test drives :class:`Call` through ``drive()`` below: a whole driver for a scripted
fake client in fifteen lines, with no decision of its own. Whatever the tests see (retries,
waits, breaker state, timeouts, errors) is the core's doing, which is what lets a driver
for another client library be a short translation layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import gateway_guard as gg
from gateway_guard._call import RAISE, RETURN, WRAP, Call, shed
from gateway_guard.breaker import BreakerState
from gateway_guard.context import CallRecord, RequestContext, reset_context, set_context
from gateway_guard.guard import UpstreamRuntime
from gateway_guard.headers import parse_traceparent
from gateway_guard.testing import FakeClock


class Headers(dict[str, str]):
    """Case-insensitive enough for the core: it only uses lower-case names to look up."""

    def __init__(self, **items: str) -> None:
        super().__init__({k.replace("_", "-").lower(): v for k, v in items.items()})

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key.lower(), value)


# --- a scripted fake client, and its whole driver --------------------------------------------


@dataclass
class Answer:
    """The fake client got a response; its body is in memory unless ``streamed``."""

    status: int
    headers: Headers = field(default_factory=Headers)
    takes: float = 0.0
    streamed: bool = False


@dataclass
class Fail:
    """The fake client raised; the driver has already classified it as ``error``."""

    error: gg.UpstreamError
    reached: bool = True
    takes: float = 0.0


@dataclass
class Log:
    timeouts: list[tuple[float, float]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


def drive(call: Call, script: list[Answer | Fail], clock: FakeClock, log: Log) -> float:
    """A driver: send, sleep, repeat, as the core says. Returns RETURN or WRAP."""
    while True:
        log.timeouts.append((call.connect_timeout, call.read_timeout))
        step = script.pop(0)
        clock.advance(step.takes)
        if isinstance(step, Fail):
            wait = call.failed(step.error, step.reached)
            if wait < 0.0:
                raise step.error
        else:
            wait = call.answered(step.status, step.headers, not step.streamed)
            if wait == RAISE:
                raise call.status_error()
            if wait < 0.0:
                return wait
        log.waits.append(wait)
        clock.advance(wait)
        call.admit()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def log() -> Log:
    return Log()


# Waits are exact (no jitter); the breaker only trips where a test says so.
SETTINGS: dict[str, Any] = {
    "connect_timeout": 1.0,
    "read_timeout": 2.0,
    "deadline": 6.0,
    "retry": {"backoff_initial": 0.1, "jitter": False},
    "breaker": {"min_calls": 100, "window_size": 100, "open_seconds": 30.0},
}
# Trips on the 4th failure in a row.
TRIPPY = {"min_calls": 4, "window_size": 4, "open_seconds": 30.0}


def make_guard(clock: FakeClock, **overrides: Any) -> gg.Guard:
    """A Guard with upstream ``up``; keyword arguments replace its SETTINGS keys."""
    settings = {**SETTINGS, **overrides}
    routes = settings.pop("routes", [])
    return gg.Guard({"upstreams": {"up": settings}, "routes": routes}, clock=clock)


def runtime(clock: FakeClock, **overrides: Any) -> UpstreamRuntime:
    return make_guard(clock, **overrides).runtime("up")


def call_to(rt: UpstreamRuntime, method: str = "GET", **headers: str) -> Call:
    """A new call, its first attempt admitted, as a driver starts one (body in memory)."""
    return Call(rt, method, Headers(**headers), False)


def refused() -> Fail:
    """A connect that failed: the request never left."""
    return Fail(gg.UpstreamConnectError("refused", proxy_error="connection_refused"), False)


def reset() -> Fail:
    """The connection broke after the request was sent."""
    return Fail(gg.UpstreamProtocolError("reset", proxy_error="connection_terminated"))


@pytest.fixture
def context() -> Iterator[Any]:
    tokens = []

    def enter(rt: UpstreamRuntime, **fields: Any) -> RequestContext:
        ctx = RequestContext(guard=None, request_id="req-1", **fields)  # type: ignore[arg-type]
        tokens.append(set_context(ctx))
        return ctx

    yield enter
    for token in reversed(tokens):
        reset_context(token)


# --- retries ---------------------------------------------------------------------------------


def test_retries_a_failure_status_with_backoff(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    call = call_to(rt)

    assert drive(call, [Answer(503), Answer(502), Answer(200)], clock, log) == RETURN
    assert log.waits == [0.1, 0.2]
    assert call.attempt == 3


def test_status_error_after_retries_are_spent(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    call = call_to(rt)

    with pytest.raises(gg.UpstreamStatusError) as info:
        drive(call, [Answer(503)] * 3, clock, log)
    assert (info.value.received_status, info.value.attempts) == (503, 3)
    assert info.value.elapsed == pytest.approx(0.3)


def test_failure_status_returned_when_the_caller_wants_it(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock, raise_on_failure_status=False, retry={"attempts": 1})
    call = call_to(rt)

    assert drive(call, [Answer(503)], clock, log) == RETURN


def test_post_is_not_retried_once_it_may_have_reached_the_upstream(
    clock: FakeClock, log: Log
) -> None:
    rt = runtime(clock)

    with pytest.raises(gg.UpstreamProtocolError) as info:
        drive(call_to(rt, "POST"), [reset(), Answer(200)], clock, log)
    assert info.value.attempts == 1
    # A failure status is an answer: the POST reached the upstream.
    with pytest.raises(gg.UpstreamStatusError):
        drive(call_to(rt, "POST"), [Answer(503)], clock, log)


def test_post_is_retried_when_it_never_left_or_carries_an_idempotency_key(
    clock: FakeClock, log: Log
) -> None:
    rt = runtime(clock)

    call = call_to(rt, "POST")
    assert drive(call, [refused(), Answer(201)], clock, log) == RETURN

    keyed = call_to(rt, "POST", Idempotency_Key="k-1")
    assert drive(keyed, [reset(), Answer(503), Answer(201)], clock, log) == RETURN


def test_a_streaming_body_is_never_sent_twice(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    call = Call(rt, "PUT", Headers(), True)

    with pytest.raises(gg.UpstreamConnectError):
        drive(call, [refused(), Answer(200)], clock, log)


def test_a_deterministic_failure_is_not_retried(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    bad_cert = gg.UpstreamConnectError("cert", proxy_error="tls_certificate_error")

    with pytest.raises(gg.UpstreamConnectError):
        drive(call_to(rt), [Fail(bad_cert, False)], clock, log)
    assert log.waits == []


def test_retry_after_is_honoured(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    call = call_to(rt)

    busy = Answer(503, Headers(Retry_After="2"))
    assert drive(call, [busy, Answer(200)], clock, log) == RETURN
    assert log.waits == [2.0]  # not the 0.1 s of the backoff


def test_retry_after_beyond_the_deadline_fails_at_once(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    call = call_to(rt)

    with pytest.raises(gg.UpstreamStatusError) as info:
        drive(call, [Answer(503, Headers(Retry_After="9")), Answer(200)], clock, log)
    assert (info.value.attempts, info.value.retry_after) == (1, 9.0)


def test_retry_after_that_leaves_no_time_to_connect_fails_at_once(
    clock: FakeClock, log: Log
) -> None:
    # #15: 5 s of the 6 s deadline would leave the retry less than its 1 s connect timeout;
    # rather than wait 5 s for an attempt that cannot succeed, hand the Retry-After on.
    rt = runtime(clock)
    call = call_to(rt)

    with pytest.raises(gg.UpstreamStatusError) as info:
        drive(call, [Answer(503, Headers(Retry_After="5")), Answer(200)], clock, log)
    assert (info.value.attempts, info.value.retry_after, log.waits) == (1, 5.0, [])


def test_retry_after_inside_an_inbound_request_must_fit_its_deadline(
    clock: FakeClock, log: Log, context: Any
) -> None:
    rt = runtime(clock)
    context(rt, deadline_at=clock() + 2.5)  # the visitor's deadline, before the call's 6 s

    with pytest.raises(gg.UpstreamStatusError) as info:
        drive(call_to(rt), [Answer(503, Headers(Retry_After="2")), Answer(200)], clock, log)
    assert (info.value.attempts, info.value.retry_after, log.waits) == (1, 2.0, [])


def test_a_pool_wait_that_timed_out_is_retried_and_not_held_against_the_upstream(
    clock: FakeClock, log: Log
) -> None:
    rt = runtime(clock, breaker={"min_calls": 1, "window_size": 1})
    pool_full = Fail(gg.LoadShedError("pool", proxy_error="connection_limit_reached"), False)

    call = call_to(rt, "POST")
    assert drive(call, [pool_full, Answer(200)], clock, log) == RETURN
    assert rt.breaker.state is BreakerState.CLOSED


# --- the breaker -----------------------------------------------------------------------------


def test_failures_open_the_breaker_and_it_refuses_the_next_call(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock, retry={"attempts": 1}, breaker=TRIPPY)
    for _ in range(4):
        with pytest.raises(gg.UpstreamProtocolError):
            drive(call_to(rt), [reset()], clock, log)
    assert rt.breaker.state is BreakerState.OPEN

    with pytest.raises(gg.CircuitOpenError) as info:
        call_to(rt)
    assert info.value.attempts == 0
    assert info.value.retry_after == pytest.approx(30.0)


def test_the_breaker_opening_between_retries_stops_them(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    rt.breaker.force_open()
    with pytest.raises(gg.CircuitOpenError):
        call_to(rt)
    rt.breaker.reset()

    call = call_to(rt)
    assert call.answered(503, Headers(), True) >= 0.0
    rt.breaker.force_open()
    with pytest.raises(gg.CircuitOpenError) as info:
        call.admit()
    assert (info.value.attempts, info.value.received_status) == (1, 503)


def test_a_probe_slot_is_given_back_when_the_attempt_is_cancelled(clock: FakeClock) -> None:
    rt = runtime(
        clock,
        retry={"attempts": 1},
        breaker={"min_calls": 1, "window_size": 1, "half_open_calls": 1},
    )
    call_to(rt).failed(reset().error, True)
    clock.advance(31.0)

    probe = call_to(rt)
    assert probe.probe
    probe.cancelled()
    assert call_to(rt).probe  # the slot came back


def test_a_streamed_body_settles_the_breaker_when_it_ends(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock, retry={"attempts": 1}, breaker={"min_calls": 1, "window_size": 1})

    call = call_to(rt)
    assert drive(call, [Answer(200, streamed=True)], clock, log) == WRAP
    assert rt.breaker.state is BreakerState.CLOSED
    error = gg.UpstreamProtocolError("cut", proxy_error="http_response_incomplete")
    call.body_failed(error)
    assert rt.breaker.state is BreakerState.OPEN
    assert error.attempts == 1


# --- deadlines and timeouts ------------------------------------------------------------------


def test_attempt_timeouts_are_clipped_to_the_deadline(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock)
    call = call_to(rt)

    timed_out = Fail(gg.UpstreamTimeout("read", proxy_error="connection_read_timeout"), True, 2.0)
    with pytest.raises(gg.UpstreamTimeout) as info:
        drive(call, [timed_out, timed_out, timed_out], clock, log)
    assert log.timeouts == [(1.0, 2.0), (1.0, 2.0), pytest.approx((1.0, 1.7))]
    # The last attempt was cut to the deadline, and the deadline is what ran out.
    assert info.value.proxy_error == "http_response_timeout"


def test_the_inbound_requests_deadline_clips_the_call(
    clock: FakeClock, log: Log, context: Any
) -> None:
    rt = runtime(clock)
    context(rt, deadline_at=clock() + 0.5)
    call = call_to(rt)
    assert (call.connect_timeout, call.read_timeout) == (0.5, 0.5)

    clock.advance(0.5)
    with pytest.raises(gg.UpstreamTimeout) as info:
        call_to(rt)
    assert (info.value.attempts, info.value.proxy_error) == (0, "http_response_timeout")


def test_a_wait_longer_than_the_deadline_left_is_not_taken(clock: FakeClock, log: Log) -> None:
    rt = runtime(clock, retry={"backoff_initial": 5.0, "backoff_max": 5.0, "jitter": False})
    call = call_to(rt)

    with pytest.raises(gg.UpstreamStatusError):
        drive(call, [Answer(503, takes=1.5), Answer(200)], clock, log)


# --- the route's policy, propagation, diagnostics --------------------------------------------


def test_the_routes_policy_for_the_upstream_wins(clock: FakeClock, log: Log, context: Any) -> None:
    guard = make_guard(clock, routes=[{"path": "/orders/{id}", "retry": {"attempts": 1}}])
    rt = guard.runtime("up")
    route = guard.policies.routes.resolve("GET", "/orders/42")[1]
    assert route is not None

    assert (
        drive(call_to(rt), [Answer(503), Answer(200)], clock, log) == RETURN
    )  # outside the route: the upstream's 3 attempts
    context(rt, route=route)
    with pytest.raises(gg.UpstreamStatusError) as info:
        drive(call_to(rt), [Answer(503), Answer(200)], clock, log)
    assert info.value.attempts == 1


def test_request_id_and_trace_are_propagated_unless_set(clock: FakeClock, context: Any) -> None:
    rt = runtime(clock)
    inbound = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    context(rt, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", traceparent=inbound)

    headers = Headers()
    Call(rt, "GET", headers, False)
    assert headers["x-request-id"] == "req-1"
    # Passed on as it came: its parent-id is the caller's span, which exists.
    assert headers["traceparent"] == inbound

    own = Headers(X_Request_ID="mine", Traceparent="t")
    Call(rt, "GET", own, False)
    assert (own["x-request-id"], own["traceparent"]) == ("mine", "t")


def test_no_traceparent_is_invented_unless_asked(clock: FakeClock, context: Any) -> None:
    rt = runtime(clock)
    context(rt)
    headers = Headers()
    Call(rt, "GET", headers, False)
    assert headers["x-request-id"] == "req-1" and "traceparent" not in headers

    rt.start_traces = True  # tracing.start_traces = true
    headers = Headers()
    Call(rt, "GET", headers, False)
    parsed = parse_traceparent(headers["traceparent"])
    assert parsed is not None and parsed[2] == "01"


def test_the_requests_diagnostics_record_each_call(
    clock: FakeClock, log: Log, context: Any
) -> None:
    rt = runtime(clock)
    ctx = context(rt)

    drive(call_to(rt), [Answer(503), Answer(200)], clock, log)
    with pytest.raises(gg.UpstreamConnectError):
        drive(call_to(rt), [refused()] * 3, clock, log)
    refusal = gg.LoadShedError("full", upstream="up", elapsed=0.25)
    assert shed(rt, refusal) is refusal

    assert ctx.calls == [
        CallRecord("up", 2, pytest.approx(0.1), 200, None),  # type: ignore[arg-type]
        CallRecord("up", 3, pytest.approx(0.3), None, "connection_refused"),  # type: ignore[arg-type]
        CallRecord("up", 0, 0.25, None, "connection_limit_reached"),
    ]
