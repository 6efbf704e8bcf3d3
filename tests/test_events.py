"""Event hooks (gateway_guard.events): what each decision emits, and that hooks are safe.

Calls go through the real httpx driver over ``httpx.MockTransport``, on a fake clock, so
the events seen are the ones every driver emits (they come from the call core).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard import events as ev
from gateway_guard.breaker import BreakerState, CircuitBreaker, Transition
from gateway_guard.inbound import admit, release, respond, start, try_admit
from gateway_guard.policy import BreakerPolicy
from gateway_guard.retry import testing
from gateway_guard.testing import FakeClock


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    with testing():
        yield


def make_guard(clock: FakeClock | None = None, **upstream: Any) -> gg.Guard:
    return gg.Guard(
        {"upstreams": {"up": {"base_url": "http://up.test", **upstream}}},
        clock=clock or FakeClock(),
    )


def recorder(guard: gg.Guard, event: type[ev.Event] = ev.Event) -> list[ev.Event]:
    seen: list[ev.Event] = []
    guard.on(event, seen.append)
    return seen


def scripted(*statuses: int) -> httpx.MockTransport:
    answers = list(statuses)
    return httpx.MockTransport(lambda request: httpx.Response(answers.pop(0)))


def kinds(events: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_no_hook_no_emitter() -> None:
    guard = make_guard()
    assert guard.emitter is None and guard.runtime("up").hooks is None
    stop = guard.on(ev.CallEnded, lambda e: None)
    assert guard.emitter is guard.hooks and guard.runtime("up").hooks is guard.hooks
    stop()
    stop()  # a second time does nothing
    assert guard.emitter is None and guard.runtime("up").hooks is None


def test_a_call_retried_twice() -> None:
    guard = make_guard()
    seen = recorder(guard)
    with guard.client("up", transport=scripted(503, 502, 200)) as client:
        assert client.get("/x").status_code == 200
    assert kinds(seen) == [
        "AttemptStarted",
        "AttemptEnded",
        "RetryScheduled",
        "AttemptStarted",
        "AttemptEnded",
        "RetryScheduled",
        "AttemptStarted",
        "AttemptEnded",
        "CallEnded",
    ]
    started = [e for e in seen if isinstance(e, ev.AttemptStarted)]
    assert [e.attempt for e in started] == [1, 2, 3]
    assert {e.call_id for e in seen if hasattr(e, "call_id")} == {started[0].call_id}
    ended = [e for e in seen if isinstance(e, ev.AttemptEnded)]
    assert [(e.outcome, e.status) for e in ended] == [
        ("failure", 503),
        ("failure", 502),
        ("success", 200),
    ]
    call = seen[-1]
    assert isinstance(call, ev.CallEnded)
    assert (call.upstream, call.method, call.outcome, call.attempts, call.status) == (
        "up",
        "GET",
        "success",
        3,
        200,
    )
    assert started[0].headers.get("host") == "up.test"  # the request's own headers


def test_a_call_given_up() -> None:
    guard = make_guard()
    seen = recorder(guard)
    with (
        guard.client("up", transport=scripted(503, 503, 503)) as client,
        pytest.raises(gg.UpstreamStatusError),
    ):
        client.get("/x")
    given_up = [e for e in seen if isinstance(e, ev.CallGivenUp)]
    assert len(given_up) == 1
    assert (given_up[0].reason, given_up[0].attempts, given_up[0].status) == (
        "attempts_exhausted",
        3,
        503,
    )
    assert kinds(seen)[-2:] == ["CallGivenUp", "CallEnded"]
    assert isinstance(seen[-1], ev.CallEnded) and seen[-1].outcome == "failure"


def test_a_transport_error_that_is_not_retried() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("reset", request=request)

    guard = make_guard()
    seen = recorder(guard)
    with (
        guard.client("up", transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(gg.UpstreamError),
    ):
        client.post("/charges")  # not idempotent, and it may have reached the upstream
    ended = [e for e in seen if isinstance(e, ev.AttemptEnded)]
    assert [(e.outcome, e.proxy_error is not None) for e in ended] == [("failure", True)]
    given_up = next(e for e in seen if isinstance(e, ev.CallGivenUp))
    assert given_up.reason == "non_idempotent" and given_up.method == "POST"


def test_breaker_transition_and_rejection() -> None:
    clock = FakeClock()
    guard = make_guard(clock, breaker={"min_calls": 2, "window_size": 2}, retry={"attempts": 1})
    seen = recorder(guard)
    with guard.client("up", transport=scripted(500, 500)) as client:
        for _ in range(2):
            with pytest.raises(gg.UpstreamStatusError):
                client.get("/x")
        with pytest.raises(gg.CircuitOpenError):
            client.get("/x")
    transition = next(e for e in seen if isinstance(e, ev.BreakerTransitioned))
    assert (transition.upstream, transition.old, transition.new, transition.reason) == (
        "up",
        "closed",
        "open",
        "failure_rate",
    )
    rejected = [e for e in seen if isinstance(e, ev.BreakerRejected)]
    assert len(rejected) == 1 and rejected[0].state == "open" and rejected[0].attempt == 1
    assert rejected[0].retry_after == pytest.approx(30.0)
    assert isinstance(seen[-1], ev.CallEnded)
    assert (seen[-1].outcome, seen[-1].attempts) == ("rejected", 0)


def test_bulkhead_rejection() -> None:
    guard = make_guard(bulkhead={"max_concurrent": 1})
    seen = recorder(guard, ev.BulkheadRejected)
    inner_calls: list[None] = []

    def reenter(request: httpx.Request) -> httpx.Response:
        # The only slot is held by this call: a nested call to the same upstream is refused.
        inner_calls.append(None)
        with guard.client("up", transport=scripted(200)) as nested, pytest.raises(gg.LoadShedError):
            nested.get("/nested")
        return httpx.Response(200)

    with guard.client("up", transport=httpx.MockTransport(reenter)) as client:
        assert client.get("/x").status_code == 200
    assert [(e.upstream, e.route) for e in seen] == [("up", None)]  # type: ignore[attr-defined]


def test_budget_exhausted() -> None:
    guard = make_guard(retry={"budget_ratio": 0.0, "budget_min_per_second": 0.0})
    seen = recorder(guard)
    with (
        guard.client("up", transport=scripted(503)) as client,
        pytest.raises(gg.UpstreamStatusError),
    ):
        client.get("/x")
    assert "BudgetExhausted" in kinds(seen)
    given_up = next(e for e in seen if isinstance(e, ev.CallGivenUp))
    assert given_up.reason == "budget" and given_up.attempts == 1


def test_a_streamed_body_ends_the_call_once() -> None:
    guard = make_guard()
    seen = recorder(guard, ev.CallEnded)
    with (
        guard.client("up", transport=scripted(200)) as client,
        client.stream("GET", "/x") as response,
    ):
        response.read()
    assert [e.outcome for e in seen] == ["success"]  # type: ignore[attr-defined]


def test_async_calls_emit_the_same_events() -> None:
    guard = make_guard()
    seen = recorder(guard)

    async def main() -> None:
        async with guard.async_client("up", transport=scripted(502, 200)) as client:
            assert (await client.get("/x")).status_code == 200

    asyncio.run(main())
    assert kinds(seen) == [
        "AttemptStarted",
        "AttemptEnded",
        "RetryScheduled",
        "AttemptStarted",
        "AttemptEnded",
        "CallEnded",
    ]


def test_the_base_class_and_one_class() -> None:
    guard = make_guard()
    everything = recorder(guard)
    only_calls = recorder(guard, ev.CallEnded)
    with guard.client("up", transport=scripted(200)) as client:
        client.get("/x")
    assert len(everything) == 3 and len(only_calls) == 1


def test_a_hook_that_raises_never_breaks_a_call(caplog: pytest.LogCaptureFixture) -> None:
    guard = make_guard()

    def broken(event: ev.Event) -> None:
        raise RuntimeError("hook bug")

    guard.on(ev.Event, broken)
    seen = recorder(guard, ev.CallEnded)
    with (
        caplog.at_level(logging.ERROR, logger="gateway_guard"),
        guard.client("up", transport=scripted(200, 200)) as client,
    ):
        assert client.get("/x").status_code == 200
        assert client.get("/y").status_code == 200
    assert len(seen) == 2  # the hooks after the broken one still run
    failures = [r for r in caplog.records if "event hook" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # logged once
    assert guard.hooks.failures == 6


def test_on_rejects_what_is_not_an_event() -> None:
    guard = make_guard()
    with pytest.raises(TypeError, match="Event class"):
        guard.on(int, print)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="callable"):
        guard.on(ev.CallEnded, "nope")  # type: ignore[arg-type]


# --- inbound -----------------------------------------------------------------------------------


def test_inbound_admitted_released_and_shed() -> None:
    guard = gg.Guard({"shed": {"max_concurrent": 1, "max_queue": 0}, "upstreams": {"up": {}}})
    seen = recorder(guard)
    first = start(guard, "GET", "/a", None, None)
    assert try_admit(first)
    second = start(guard, "GET", "/b", None, None)
    refusal = admit(second)
    assert isinstance(refusal, gg.LoadShedError)
    respond(second, refusal, "text/plain", "GET")
    release(first)
    release(first)  # once only
    assert kinds(seen) == [
        "InboundAdmitted",
        "InboundShed",
        "GatewayErrorAnswered",
        "InboundReleased",
    ]
    shed = seen[1]
    assert isinstance(shed, ev.InboundShed)
    assert (shed.route, shed.reason, shed.upstream) == (None, "capacity", None)
    answered = seen[2]
    assert isinstance(answered, ev.GatewayErrorAnswered)
    assert (answered.request_id, answered.status, answered.started) == (
        second.request_id,
        503,
        False,
    )
    assert answered.error is refusal


def test_inbound_dependency_down() -> None:
    guard = gg.Guard(
        {"upstreams": {"pay": {}}, "routes": [{"path": "/checkout", "depends_on": ["pay"]}]}
    )
    guard.breaker("pay").force_open()
    seen = recorder(guard, ev.InboundShed)
    ctx = start(guard, "GET", "/checkout", None, None)
    assert isinstance(admit(ctx), gg.CircuitOpenError)
    assert [(e.route, e.reason, e.upstream) for e in seen] == [  # type: ignore[attr-defined]
        ("/checkout", "dependency_down", "pay")
    ]


# --- CircuitBreaker.subscribe ------------------------------------------------------------------


def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(
        "pay", BreakerPolicy(min_calls=2, window_size=2, open_seconds=10.0), clock=clock
    )


def test_subscribe_reports_every_transition_with_its_reason() -> None:
    clock = FakeClock()
    b = breaker(clock)
    seen: list[Transition] = []
    stop = b.subscribe(seen.append)
    for _ in range(2):
        b.record_failure(0.1, b.admit())
    clock.advance(10.0)
    probe = b.admit()
    b.record_success(0.1, probe)
    for _ in range(2):
        b.record_success(0.1, b.admit())
    b.force_open()
    b.reset()
    assert [(t.old, t.new, t.reason) for t in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN, "failure_rate"),
        (BreakerState.OPEN, BreakerState.HALF_OPEN, "open_elapsed"),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED, "probes_succeeded"),
        (BreakerState.CLOSED, BreakerState.FORCED_OPEN, "force_open"),
        (BreakerState.FORCED_OPEN, BreakerState.CLOSED, "reset"),
    ]
    assert all(t.upstream == "pay" and t.at > 1e9 for t in seen)  # wall-clock seconds
    stop()
    b.force_open()
    assert len(seen) == 5


def test_subscribers_run_after_the_lock_is_released() -> None:
    clock = FakeClock()
    b = breaker(clock)
    snapshots: list[Any] = []
    # Reading the breaker from the callback would deadlock if the lock were still held.
    b.subscribe(lambda t: snapshots.append(b.snapshot().state))
    done = threading.Event()

    def trip() -> None:
        for _ in range(2):
            b.record_failure(0.1, b.admit())
        done.set()

    threading.Thread(target=trip, daemon=True).start()
    assert done.wait(5.0)
    assert snapshots == [BreakerState.OPEN]


def test_a_subscriber_that_raises_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    b = breaker(clock)
    later: list[Transition] = []

    def broken(transition: Transition) -> None:
        raise RuntimeError("subscriber bug")

    b.subscribe(broken)
    b.subscribe(later.append)
    with caplog.at_level(logging.ERROR, logger="gateway_guard"):
        b.force_open()
        b.force_closed()
    assert len(later) == 2
    assert len([r for r in caplog.records if "transition subscriber" in r.getMessage()]) == 1


def test_transition_is_a_frozen_dataclass() -> None:
    t = Transition("pay", BreakerState.CLOSED, BreakerState.OPEN, "failure_rate", 1.0)
    with pytest.raises(AttributeError):
        t.reason = "x"  # type: ignore[misc]
    assert not hasattr(t, "__dict__")


def test_events_are_frozen_with_slots() -> None:
    for cls in (
        ev.AttemptStarted,
        ev.AttemptEnded,
        ev.RetryScheduled,
        ev.CallGivenUp,
        ev.CallEnded,
        ev.BreakerRejected,
        ev.BreakerTransitioned,
        ev.BulkheadRejected,
        ev.BudgetExhausted,
        ev.InboundAdmitted,
        ev.InboundReleased,
        ev.InboundShed,
        ev.GatewayErrorAnswered,
    ):
        assert issubclass(cls, ev.Event)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        assert "__slots__" in vars(cls)


# --- a call's end as fields (the package's own hooks: metrics, tracing) ----------------------


def test_a_call_end_is_built_only_for_those_that_take_events() -> None:
    guard = make_guard()
    assert guard.hooks.call_ended is None
    stop_other = guard.on(ev.AttemptStarted, lambda e: None)
    assert guard.hooks.call_ended is None  # hooks on, but nothing hears a call's end
    fields: list[tuple[Any, ...]] = []
    stop_fields = guard.hooks._on_call_end(lambda *f: fields.append(f))
    built: list[ev.Event] = []
    with guard.client("up", transport=scripted(200, 503, 503, 503)) as client:
        client.get("/x")
        stop_events = guard.on(ev.CallEnded, built.append)
        with pytest.raises(gg.UpstreamStatusError):
            client.get("/y")
    assert [f[4:6] for f in fields] == [("success", 1), ("failure", 3)]
    assert len(built) == 1  # only the call made while an event callback listened
    [event] = built
    assert isinstance(event, ev.CallEnded)
    assert fields[1] == tuple(getattr(event, name) for name in event.__dataclass_fields__)
    stop_events()
    stop_fields()
    assert guard.hooks.call_ended is None and guard.emitter is guard.hooks
    stop_other()
    assert guard.emitter is None


def test_a_field_callback_that_raises_never_breaks_a_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = make_guard()

    def broken(*fields: Any) -> None:
        raise RuntimeError("hook bug")

    guard.hooks._on_call_end(broken)
    seen = recorder(guard, ev.CallEnded)
    with (
        caplog.at_level(logging.ERROR, logger="gateway_guard"),
        guard.client("up", transport=scripted(200, 200)) as client,
    ):
        assert client.get("/x").status_code == 200
        assert client.get("/y").status_code == 200
    assert len(seen) == 2  # the event's callbacks still run
    failures = [r for r in caplog.records if "event hook" in r.getMessage()]
    assert len(failures) == 1 and "CallEnded" in failures[0].getMessage()
    assert guard.hooks.failures == 2


def test_attempts_are_reported_only_while_heard() -> None:
    guard = make_guard()
    ends = recorder(guard, ev.CallEnded)
    assert not guard.hooks.each_attempt  # a success then reports only its end
    with guard.client("up", transport=scripted(200, 200, 200)) as client:
        client.get("/x")
        attempts = recorder(guard, ev.AttemptEnded)
        assert guard.hooks.each_attempt
        client.get("/y")
        started = recorder(guard, ev.AttemptStarted)
        client.get("/z")
    assert [e.outcome for e in ends if isinstance(e, ev.CallEnded)] == ["success"] * 3
    assert len(attempts) == 2 and len(started) == 1
