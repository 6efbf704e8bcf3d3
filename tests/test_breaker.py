"""The circuit breaker's rules, on a fake clock: nothing here sleeps."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from gateway_guard.breaker import (
    HALF_OPEN_RETRY_AFTER,
    BreakerSnapshot,
    BreakerState,
    CallOutcome,
    CircuitBreaker,
    _CountWindow,
)
from gateway_guard.errors import CircuitOpenError, UpstreamError
from gateway_guard.policy import BreakerPolicy
from gateway_guard.testing import FakeClock

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
FORCED_OPEN = BreakerState.FORCED_OPEN
DISABLED = BreakerState.DISABLED


def make(
    clock: FakeClock | None = None,
    random: Callable[[], float] = lambda: 0.0,
    **policy: Any,
) -> tuple[CircuitBreaker, FakeClock]:
    clock = clock or FakeClock()
    # The rules below were written against a 50% threshold; the default's own tests say so.
    policy.setdefault("failure_rate", 0.5)
    breaker = CircuitBreaker("payments", BreakerPolicy(**policy), clock=clock, random=random)
    return breaker, clock


def succeed(breaker: CircuitBreaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        breaker.record_success(duration, breaker.admit())


def fail(breaker: CircuitBreaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        breaker.record_failure(duration, breaker.admit())


def trip(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.policy.min_calls)
    assert breaker.state is OPEN


def rejection(breaker: CircuitBreaker) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    return info.value


# --- basics --------------------------------------------------------------------------------


def test_state_values_are_the_public_strings() -> None:
    assert [s.value for s in BreakerState] == [
        "closed",
        "open",
        "half_open",
        "forced_open",
        "disabled",
    ]
    text: str = BreakerState.HALF_OPEN
    assert text == "half_open"
    assert BreakerState("forced_open") is BreakerState.FORCED_OPEN
    assert str(BreakerState.FORCED_OPEN) == "forced_open"


def test_a_new_breaker_is_closed_and_admits_non_probes() -> None:
    breaker, _ = make()
    assert breaker.state is CLOSED
    assert breaker.admit() is False
    assert breaker.retry_after() is None
    assert repr(breaker) == "<CircuitBreaker 'payments' closed>"


def test_a_disabled_policy_starts_disabled_and_counts_nothing() -> None:
    breaker, _ = make(enabled=False, min_calls=1, window_size=1)
    assert breaker.state is DISABLED
    fail(breaker, 50)
    assert breaker.state is DISABLED
    assert breaker.snapshot().calls == 0


# --- tripping ------------------------------------------------------------------------------


def test_no_trip_below_min_calls_even_when_everything_fails() -> None:
    breaker, _ = make(min_calls=5, window_size=10)
    fail(breaker, 4)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_the_call_that_reaches_min_calls_can_be_a_success() -> None:
    breaker, _ = make(min_calls=10, window_size=10, failure_rate=0.5)
    fail(breaker, 5)
    succeed(breaker, 4)
    assert breaker.state is CLOSED
    succeed(breaker)  # 5 of 10 failed: exactly the threshold
    assert breaker.state is OPEN


@pytest.mark.parametrize("window", ["count", "time"])
def test_failure_rate_threshold_is_inclusive_and_exact(window: str) -> None:
    # 3 / 10 and 0.3 are the same float; a rate computed as 0.3 * 10 would miss it.
    breaker, _ = make(window=window, min_calls=10, window_size=10, failure_rate=0.3)
    succeed(breaker, 7)
    fail(breaker, 2)
    succeed(breaker)
    assert breaker.state is CLOSED  # 2 of 10
    fail(breaker)  # count window: 3 of the last 10; time window: 3 of 11
    expected = OPEN if window == "count" else CLOSED
    assert breaker.state is expected


def test_just_below_the_threshold_stays_closed() -> None:
    breaker, _ = make(min_calls=10, window_size=10, failure_rate=0.3)
    succeed(breaker, 8)
    fail(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.snapshot().failure_rate == pytest.approx(0.2)


def test_no_failures_never_trips_even_at_failure_rate_zero() -> None:
    breaker, _ = make(min_calls=2, window_size=4, failure_rate=0.0)
    succeed(breaker, 20)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_count_window_keeps_only_the_last_calls() -> None:
    breaker, _ = make(min_calls=4, window_size=4, failure_rate=0.75)
    pattern = "FSFSSSFFSS"
    for index, outcome in enumerate(pattern):
        (fail if outcome == "F" else succeed)(breaker)
        last = pattern[max(0, index - 3) : index + 1]
        snap = breaker.snapshot()
        assert (snap.calls, snap.failures) == (len(last), last.count("F"))
    assert breaker.state is CLOSED


def test_count_window_trips_when_old_successes_slide_out() -> None:
    breaker, _ = make(min_calls=4, window_size=4, failure_rate=0.75)
    succeed(breaker, 4)
    fail(breaker, 2)
    assert breaker.state is CLOSED  # S S F F
    fail(breaker)  # S F F F
    assert breaker.state is OPEN


def test_time_window_buckets_expire_with_the_clock() -> None:
    breaker, clock = make(window="time", window_size=10, min_calls=3, failure_rate=0.75)
    clock.now = 100.2
    fail(breaker, 2)
    clock.now = 105.0
    succeed(breaker, 2)
    clock.now = 109.99  # second 109: seconds 100..109 are all in the window
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures) == (4, 2)
    clock.now = 110.0  # second 100 has left the window
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures) == (2, 0)
    clock.now = 114.999
    assert breaker.snapshot().calls == 2
    clock.now = 115.0
    assert breaker.snapshot().calls == 0
    assert breaker.state is CLOSED


def test_time_window_a_gap_longer_than_the_window_clears_everything() -> None:
    breaker, clock = make(window="time", window_size=5, min_calls=3, failure_rate=0.5)
    fail(breaker, 2)
    clock.advance(10_000_000.0)
    fail(breaker, 2)
    assert breaker.snapshot().calls == 2
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_time_window_expiry_can_make_a_success_trip() -> None:
    breaker, clock = make(window="time", window_size=10, min_calls=4, failure_rate=0.5)
    clock.now = 0.0
    succeed(breaker, 6)
    clock.now = 5.0
    fail(breaker, 3)
    assert breaker.state is CLOSED  # 3 of 9
    clock.now = 10.0  # the six successes expire: 3 failures, then this success
    succeed(breaker)
    assert breaker.state is OPEN


def test_time_window_counts_many_calls_in_one_second() -> None:
    breaker, clock = make(window="time", window_size=2, min_calls=1000, failure_rate=0.5)
    succeed(breaker, 500)
    fail(breaker, 400)
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures) == (900, 400)
    clock.advance(1.0)
    succeed(breaker, 10)
    assert breaker.snapshot().calls == 910
    clock.advance(1.0)
    assert breaker.snapshot().calls == 10


# --- slow calls ----------------------------------------------------------------------------


def test_slow_calls_trip_when_slow_rate_is_below_one() -> None:
    breaker, _ = make(min_calls=4, window_size=4, slow_call_seconds=1.0, slow_call_rate=0.5)
    succeed(breaker, 2, duration=0.1)
    succeed(breaker, 1, duration=1.0)  # exactly the limit is slow
    assert breaker.state is CLOSED
    succeed(breaker, 1, duration=3.0)
    snap = breaker.snapshot()
    assert (snap.failures, snap.slow) == (0, 2)
    assert snap.state is OPEN


def test_slow_rate_of_one_means_slow_calls_never_trip_on_their_own() -> None:
    breaker, _ = make(min_calls=4, window_size=4, slow_call_seconds=1.0, slow_call_rate=1.0)
    succeed(breaker, 10, duration=60.0)
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures, snap.slow) == (CLOSED, 4, 0, 4)
    assert snap.slow_rate == 1.0


def test_a_slow_failure_counts_as_failure_and_as_slow() -> None:
    breaker, _ = make(min_calls=10, window_size=10, slow_call_seconds=1.0)
    fail(breaker, 1, duration=2.0)
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures, snap.slow) == (1, 1, 1)


def test_slow_calls_slide_out_of_the_count_window() -> None:
    breaker, _ = make(min_calls=2, window_size=2, slow_call_seconds=1.0, slow_call_rate=1.0)
    fail(breaker, 1, duration=5.0)
    succeed(breaker, 1, duration=5.0)
    assert breaker.state is OPEN
    breaker.reset()
    succeed(breaker, 1, duration=5.0)
    succeed(breaker, 2, duration=0.0)
    snap = breaker.snapshot()
    assert (snap.calls, snap.slow) == (2, 0)


# --- open and half-open --------------------------------------------------------------------


def test_open_lasts_exactly_open_seconds_then_half_opens_lazily() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=30.0)
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker.add_listener(lambda _b, old, new: changes.append((old, new)))
    trip(breaker)
    clock.advance(29.999)
    error = rejection(breaker)
    assert error.retry_after == pytest.approx(0.001)
    assert breaker.retry_after() == pytest.approx(0.001)
    clock.advance(0.001)
    # The property already says half-open, but nothing has changed yet.
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() is None
    assert changes == [(CLOSED, OPEN)]
    assert breaker.admit() == 1  # a probe of the first half-open spell
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_half_open_admits_exactly_half_open_calls_probes() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=3)
    trip(breaker)
    clock.advance(10.0)
    assert [breaker.admit() for _ in range(3)] == [True, True, True]
    for _ in range(5):
        assert rejection(breaker).retry_after == HALF_OPEN_RETRY_AFTER
    assert breaker.retry_after() == HALF_OPEN_RETRY_AFTER
    assert breaker.snapshot().probes_in_flight == 3


def test_an_ignored_probe_gives_its_slot_back() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=2)
    trip(breaker)
    clock.advance(10.0)
    first, second = breaker.admit(), breaker.admit()
    assert first and second
    rejection(breaker)
    breaker.record_ignored(first)
    assert breaker.state is HALF_OPEN
    assert breaker.admit() == 1  # a probe of the first half-open spell
    rejection(breaker)
    # More ignores than probes outstanding (a confused driver) never creates extra slots.
    breaker.record_success(0.1, True)
    breaker.record_ignored(True)
    breaker.record_ignored(True)
    breaker.record_ignored(True)
    assert breaker.snapshot().probes_in_flight == 0
    assert breaker.admit() == 1  # a probe of the first half-open spell
    rejection(breaker)


def test_probe_successes_close_with_a_fresh_window() -> None:
    breaker, clock = make(min_calls=2, window_size=4, open_seconds=10.0, half_open_calls=3)
    trip(breaker)
    clock.advance(10.0)
    probes = [breaker.admit() for _ in range(3)]
    breaker.record_success(0.1, probes[0])
    breaker.record_status(404, 0.1, probes[1])  # a 4xx is the upstream answering: success
    assert breaker.state is HALF_OPEN
    breaker.record_success(0.1, probes[2])
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures, snap.consecutive_opens) == (CLOSED, 0, 0, 0)
    assert breaker.admit() is False


def test_half_open_is_judged_by_the_probes_failure_rate() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=3)
    trip(breaker)
    clock.advance(10.0)
    probes = [breaker.admit() for _ in range(3)]
    breaker.record_success(0.1, probes[0])
    breaker.record_status(502, 0.1, probes[1])
    assert breaker.state is HALF_OPEN  # 1 of 3 failed: under 50% whatever the last says
    breaker.record_success(0.1, probes[2])
    assert breaker.state is CLOSED

    trip(breaker)
    clock.advance(10.0)
    probes = [breaker.admit() for _ in range(3)]
    breaker.record_status(502, 0.1, probes[0])
    breaker.record_failure(0.1, probes[1])
    # 2 of 3 failed reaches 50% whatever the third does: re-open at once.
    assert breaker.state is OPEN
    assert breaker.snapshot().consecutive_opens == 2


def test_a_late_success_of_an_earlier_spell_cannot_close_the_breaker() -> None:
    # Issue #15, defect 3: the late success counted as a probe of the current spell.
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=2)
    trip(breaker)
    clock.advance(10.0)
    late, failed = breaker.admit(), breaker.admit()
    breaker.record_failure(0.1, failed)  # 1 of 2: re-opens, `late` still in flight
    assert breaker.state is OPEN
    clock.advance(20.0)
    current = breaker.admit()
    breaker.record_success(0.1, late)  # spell 1 reporting during spell 2: ignored
    breaker.record_success(0.1, breaker.admit())
    assert breaker.state is HALF_OPEN  # `current` has not reported yet
    breaker.record_failure(0.1, current)
    assert breaker.state is OPEN


def test_a_late_cancelled_probe_cannot_free_a_slot_of_a_later_spell() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=2)
    trip(breaker)
    clock.advance(10.0)
    late, failed = breaker.admit(), breaker.admit()
    breaker.record_failure(0.1, failed)
    clock.advance(20.0)
    assert breaker.admit() and breaker.admit()
    breaker.record_ignored(late)
    rejection(breaker)  # never three probes in flight with half_open_calls = 2
    assert breaker.snapshot().probes_in_flight == 2


def test_a_dropped_probe_gives_its_slot_back_and_is_heard_on_the_next_locked_call() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=1)
    seen: list[CallOutcome] = []
    breaker.add_call_listener(lambda _b, outcome, _d: seen.append(outcome))
    trip(breaker)
    clock.advance(10.0)
    probe = breaker.admit()
    seen.clear()
    breaker.record_dropped(probe)  # as a finaliser would: no lock, no listener
    assert seen == []
    assert breaker.snapshot().probes_in_flight == 0
    assert seen == [CallOutcome.IGNORED]
    assert breaker.admit() == probe  # the slot is free again, in the same spell


def test_a_slow_probe_reopens_only_when_slowness_can_trip() -> None:
    kwargs: dict[str, Any] = {
        "min_calls": 2,
        "window_size": 2,
        "open_seconds": 10.0,
        "half_open_calls": 1,
        "slow_call_seconds": 1.0,
    }
    strict, clock = make(slow_call_rate=0.5, **kwargs)
    trip(strict)
    clock.advance(10.0)
    strict.record_success(2.0, strict.admit())
    assert strict.state is OPEN

    lenient, clock = make(slow_call_rate=1.0, **kwargs)
    trip(lenient)
    clock.advance(10.0)
    lenient.record_success(2.0, lenient.admit())
    assert lenient.state is CLOSED


def test_each_reopen_doubles_the_wait_up_to_the_cap_jittered_down() -> None:
    draws = iter([0.5, 0.0, 0.999, 0.25])
    breaker, clock = make(
        random=lambda: next(draws),
        min_calls=2,
        window_size=2,
        open_seconds=10.0,
        max_open_seconds=35.0,
        half_open_calls=1,
    )
    trip(breaker)
    assert breaker.snapshot().open_remaining == 10.0  # the first open is exact

    waits = []
    for _ in range(4):
        clock.advance(breaker.snapshot().open_remaining or 0.0)
        breaker.record_failure(0.1, breaker.admit())
        waits.append(breaker.snapshot().open_remaining)
    assert waits == pytest.approx([20.0 * 0.9, 35.0, 35.0 * (1 - 0.2 * 0.999), 35.0 * 0.95])
    assert breaker.snapshot().consecutive_opens == 5

    # A successful close forgets the history: the next trip is back to open_seconds.
    clock.advance(35.0)
    breaker.record_success(0.1, breaker.admit())
    assert breaker.state is CLOSED
    trip(breaker)
    assert breaker.snapshot().open_remaining == 10.0


def test_the_wait_stays_capped_and_finite_after_many_reopens() -> None:
    rng = random.Random(7)
    breaker, clock = make(
        random=rng.random,
        min_calls=1,
        window_size=1,
        open_seconds=1.0,
        max_open_seconds=60.0,
        half_open_calls=1,
    )
    trip(breaker)
    for reopen in range(1, 2000):
        clock.advance(60.0)
        breaker.record_failure(0.0, breaker.admit())
        remaining = breaker.snapshot().open_remaining
        assert remaining is not None
        # From the 6th re-open on, 2**n seconds is past the cap: only the jitter remains.
        low = 48.0 if reopen >= 6 else 0.8 * 2.0**reopen
        assert low <= remaining <= 60.0


def test_late_results_of_calls_admitted_while_closed_do_not_count_as_probes() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=1)
    early = [breaker.admit() for _ in range(5)]
    breaker.record_failure(0.1, early[0])
    breaker.record_failure(0.1, early[1])
    assert breaker.state is OPEN
    breaker.record_success(0.1, early[2])  # finished while open: dropped
    clock.advance(10.0)
    probe = breaker.admit()
    breaker.record_success(0.1, early[3])  # finished while half-open: not the probe
    breaker.record_failure(0.1, early[4])
    assert breaker.state is HALF_OPEN
    breaker.record_success(0.1, probe)
    assert breaker.state is CLOSED


def test_a_probe_reported_after_a_manual_close_counts_as_a_normal_call() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0)
    trip(breaker)
    clock.advance(10.0)
    probe = breaker.admit()
    breaker.force_closed()
    breaker.record_failure(0.1, probe)
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, 1, 1)


# --- statuses and ignored calls ------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 204, 301, 400, 404, 409, 429, 501])
def test_statuses_outside_failure_status_are_successes(status: int) -> None:
    breaker, _ = make()
    breaker.record_status(status, 0.1, breaker.admit())
    assert (breaker.snapshot().calls, breaker.snapshot().failures) == (1, 0)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_failure_statuses_are_failures(status: int) -> None:
    breaker, _ = make()
    breaker.record_status(status, 0.1, breaker.admit())
    assert breaker.snapshot().failures == 1


def test_failure_status_comes_from_the_policy() -> None:
    breaker, _ = make(failure_status=frozenset({501}))
    breaker.record_status(501, 0.1, breaker.admit())
    breaker.record_status(503, 0.1, breaker.admit())
    assert breaker.snapshot().failures == 1


def test_consecutive_timeouts_open_without_waiting_for_min_calls() -> None:
    breaker, clock = make(min_calls=10, window_size=50, consecutive_timeouts=3)
    succeed(breaker, 20)
    for _ in range(3):  # one worker, one attempt after another: 2 s each
        probe = breaker.admit()
        clock.advance(2.0)
        breaker.record_retried(2.0, probe, timeout=True)
    assert breaker.state is OPEN
    assert breaker.snapshot().failures == 0  # retried attempts count in no rate


def test_an_answer_ends_the_timeout_streak() -> None:
    breaker, clock = make(consecutive_timeouts=3)
    succeed(breaker, 50)  # a full window of successes: the quiet, lock-free path
    for outcome in ["timeout", "timeout", "ok", "timeout", "timeout", "503", "timeout"]:
        probe = breaker.admit()
        clock.advance(2.0)
        if outcome == "ok":
            breaker.record_success(0.0, probe)
        elif outcome == "503":
            breaker.record_retried(2.0, probe)
        else:
            breaker.record_failure(2.0, probe, timeout=True)
    assert breaker.state is CLOSED


def test_overlapping_timeouts_of_concurrent_calls_need_one_more_attempt() -> None:
    # Calls in flight together that time out together are not a streak by chance: an
    # attempt that started after the first timeout must time out too.
    breaker, clock = make(consecutive_timeouts=3)
    probes = [breaker.admit() for _ in range(5)]
    clock.advance(2.0)
    for probe in probes:
        breaker.record_failure(2.0, probe, timeout=True)
    assert breaker.state is CLOSED
    probe = breaker.admit()
    clock.advance(2.0)
    breaker.record_failure(2.0, probe, timeout=True)
    assert breaker.state is OPEN


def test_consecutive_timeouts_zero_is_off() -> None:
    breaker, clock = make(consecutive_timeouts=0)
    for _ in range(9):
        probe = breaker.admit()
        clock.advance(2.0)
        breaker.record_retried(2.0, probe, timeout=True)
    assert breaker.state is CLOSED


def test_retried_attempts_count_in_no_rate() -> None:
    breaker, _ = make(min_calls=2, window_size=2)
    for _ in range(5):
        breaker.record_retried(0.1, breaker.admit())
    assert (breaker.state, breaker.snapshot().calls) == (CLOSED, 0)


def test_a_429_is_never_a_failure_even_when_listed() -> None:
    # The upstream pacing one client must not cut every caller off.
    breaker, _ = make(failure_status=frozenset({429, 503}), min_calls=1, window_size=1)
    breaker.record_status(429, 0.1, breaker.admit())
    assert (breaker.state, breaker.snapshot().failures) == (CLOSED, 0)


def test_ignored_calls_do_not_count() -> None:
    breaker, _ = make(min_calls=1, window_size=1)
    for _ in range(10):
        breaker.record_ignored(breaker.admit())
    assert breaker.snapshot().calls == 0
    assert breaker.state is CLOSED


# --- CircuitOpenError ----------------------------------------------------------------------


def test_circuit_open_error_carries_what_the_error_page_needs() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=30.0)
    trip(breaker)
    clock.advance(12.5)
    error = rejection(breaker)
    assert isinstance(error, UpstreamError)
    assert error.status == 503
    assert error.proxy_error == "destination_unavailable"
    assert error.upstream == "payments"
    assert error.retry_after == pytest.approx(17.5)
    assert error.attempts == 0
    assert "payments" in str(error)
    assert "open" in str(error)


def test_forced_open_promises_no_retry_time() -> None:
    breaker, clock = make()
    breaker.force_open()
    clock.advance(1e9)
    error = rejection(breaker)
    assert error.retry_after is None
    assert error.status == 503
    assert "forced_open" in str(error)
    assert breaker.retry_after() is None


# --- manual control ------------------------------------------------------------------------


def test_force_open_holds_until_an_operator_lets_go() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=1.0)
    breaker.force_open()
    assert breaker.state is FORCED_OPEN
    clock.advance(3600.0)
    assert breaker.state is FORCED_OPEN
    rejection(breaker)
    breaker.force_closed()
    assert breaker.state is CLOSED
    assert breaker.admit() is False


def test_disable_admits_everything_and_records_nothing() -> None:
    breaker, _ = make(min_calls=2, window_size=2)
    trip(breaker)
    breaker.disable()
    assert breaker.state is DISABLED
    assert breaker.admit() is False
    fail(breaker, 100)
    breaker.record_status(503, 0.1, True)
    breaker.record_ignored(True)
    assert breaker.state is DISABLED
    assert breaker.snapshot().calls == 2  # the window that tripped it, untouched
    breaker.force_closed()
    snap = breaker.snapshot()
    assert (snap.state, snap.calls) == (CLOSED, 0)


def test_force_closed_from_half_open_and_forced_open() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=5.0)
    trip(breaker)
    clock.advance(5.0)
    breaker.admit()
    breaker.force_closed()
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight, snap.consecutive_opens) == (CLOSED, 0, 0)
    breaker.force_open()
    breaker.force_closed()
    assert breaker.state is CLOSED


def test_reset_forgets_the_window_and_the_reopen_count() -> None:
    breaker, clock = make(
        min_calls=2, window_size=2, open_seconds=10.0, max_open_seconds=100.0, half_open_calls=1
    )
    trip(breaker)
    clock.advance(10.0)
    breaker.record_failure(0.1, breaker.admit())
    assert breaker.snapshot().consecutive_opens == 2
    breaker.reset()
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.consecutive_opens) == (CLOSED, 0, 0)
    trip(breaker)
    assert breaker.snapshot().open_remaining == 10.0


def test_reset_keeps_a_breaker_whose_policy_disabled_it_disabled() -> None:
    # "Reset every breaker" must never switch on one the configuration turned off.
    breaker, _ = make(enabled=False)
    breaker.force_open()
    breaker.reset()
    assert breaker.state is DISABLED


def test_force_closed_enables_a_breaker_whose_policy_disabled_it() -> None:
    breaker, _ = make(enabled=False)
    breaker.force_closed()
    assert breaker.state is CLOSED


# --- reading -------------------------------------------------------------------------------


def test_snapshot_of_an_open_breaker() -> None:
    breaker, clock = make(min_calls=4, window_size=4, open_seconds=30.0, slow_call_seconds=1.0)
    succeed(breaker, 1, duration=2.0)
    fail(breaker, 3)
    clock.advance(10.0)
    snap = breaker.snapshot()
    assert snap == BreakerSnapshot(
        name="payments",
        state=OPEN,
        calls=4,
        failures=3,
        slow=1,
        failure_rate=0.75,
        slow_rate=0.25,
        open_until=1030.0,
        open_remaining=20.0,
        consecutive_opens=1,
        probes_in_flight=0,
    )
    clock.advance(20.0)
    snap = breaker.snapshot()
    assert (snap.state, snap.open_until, snap.open_remaining) == (HALF_OPEN, None, None)
    with pytest.raises(AttributeError):
        snap.calls = 0  # type: ignore[misc]


def test_snapshot_of_an_empty_window_has_zero_rates() -> None:
    snap = make(window="time")[0].snapshot()
    assert (snap.calls, snap.failure_rate, snap.slow_rate) == (0, 0.0, 0.0)


# --- listeners -----------------------------------------------------------------------------


def test_state_listeners_see_every_transition_in_order() -> None:
    breaker, clock = make(min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=1)
    seen: list[tuple[CircuitBreaker, BreakerState, BreakerState]] = []
    breaker.add_listener(lambda b, old, new: seen.append((b, old, new)))
    trip(breaker)
    clock.advance(10.0)
    breaker.record_failure(0.1, breaker.admit())
    clock.advance(20.0)
    breaker.record_success(0.1, breaker.admit())
    breaker.force_open()
    breaker.force_open()  # no change, no event
    breaker.disable()
    breaker.reset()
    assert all(b is breaker for b, _, _ in seen)
    assert [(old, new) for _, old, new in seen] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
        (CLOSED, FORCED_OPEN),
        (FORCED_OPEN, DISABLED),
        (DISABLED, CLOSED),
    ]


def test_listeners_run_after_the_lock_is_released() -> None:
    breaker, _ = make(min_calls=1, window_size=1)
    inside: list[BreakerSnapshot] = []
    # The lock is not reentrant: a listener called under it would deadlock here.
    breaker.add_listener(lambda b, _old, _new: inside.append(b.snapshot()))
    breaker.add_call_listener(lambda b, _outcome, _duration: inside.append(b.snapshot()))

    worker = threading.Thread(target=fail, args=(breaker,), daemon=True)
    worker.start()
    worker.join(timeout=5.0)
    assert not worker.is_alive()
    assert [snap.state for snap in inside] == [OPEN, OPEN]


def test_a_raising_listener_is_logged_and_never_breaks_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker, clock = make(min_calls=1, window_size=1, open_seconds=1.0)
    after: list[BreakerState] = []

    def broken(_b: CircuitBreaker, _old: BreakerState, _new: BreakerState) -> None:
        raise RuntimeError("metrics backend down")

    def broken_calls(_b: CircuitBreaker, _outcome: CallOutcome, _duration: float) -> None:
        raise RuntimeError("metrics backend down")

    breaker.add_listener(broken)
    breaker.add_listener(lambda _b, _old, new: after.append(new))
    breaker.add_call_listener(broken_calls)
    with caplog.at_level(logging.ERROR, logger="gateway_guard"):
        fail(breaker)
        clock.advance(1.0)
        assert breaker.admit() == 1  # a probe of the first half-open spell
    assert after == [OPEN, HALF_OPEN]
    errors = [r for r in caplog.records if r.name == "gateway_guard"]
    assert len(errors) == 3  # two state changes, one call outcome
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in errors)
    assert "payments" in errors[0].getMessage()


def test_removed_listeners_are_not_called_and_unknown_ones_are_an_error() -> None:
    breaker, _ = make(min_calls=1, window_size=1)
    seen: list[BreakerState] = []

    def listener(_b: CircuitBreaker, _old: BreakerState, new: BreakerState) -> None:
        seen.append(new)

    breaker.add_listener(listener)
    breaker.remove_listener(listener)
    fail(breaker)
    assert seen == []
    with pytest.raises(ValueError):
        breaker.remove_listener(listener)
    with pytest.raises(ValueError):
        breaker.remove_call_listener(lambda _b, _o, _d: None)


def test_call_listeners_see_outcomes_durations_and_rejections() -> None:
    breaker, _ = make(min_calls=2, window_size=2, slow_call_seconds=1.0)
    seen: list[tuple[CallOutcome, float]] = []

    def listener(_b: CircuitBreaker, outcome: CallOutcome, duration: float) -> None:
        seen.append((outcome, duration))

    breaker.add_call_listener(listener)
    succeed(breaker, 1, duration=0.25)
    succeed(breaker, 1, duration=3.0)
    breaker.record_ignored(breaker.admit())
    fail(breaker, 1, duration=0.5)  # 1 of the last 2: trips
    rejection(breaker)
    assert seen == [
        (CallOutcome.SUCCESS, 0.25),
        (CallOutcome.SUCCESS, 3.0),
        (CallOutcome.IGNORED, 0.0),
        (CallOutcome.FAILURE, 0.5),
        (CallOutcome.REJECTED, 0.0),
    ]
    breaker.reset()  # back to CLOSED: the listener must still hear plain successes
    succeed(breaker, 1, duration=0.125)
    assert seen[-1] == (CallOutcome.SUCCESS, 0.125)

    # Without call listeners successes go back to the fast path, and still count.
    breaker.remove_call_listener(listener)
    breaker.reset()
    succeed(breaker, 3)
    assert len(seen) == 6
    assert breaker.snapshot().calls == 2


# --- a reference model, compared over random histories -------------------------------------


@dataclass
class Model:
    """The breaker's rules written the obvious way: a list of calls, rates recomputed."""

    policy: BreakerPolicy
    rng: random.Random
    state: BreakerState = CLOSED
    calls: list[tuple[int, bool, bool]] = field(default_factory=list)  # (second, failed, slow)
    open_until: float = 0.0
    opens: int = 0
    spell: int = 0
    probes: int = 0
    probe_results: int = 0
    probe_failures: int = 0
    probe_slow: int = 0

    def window(self, now: float) -> list[tuple[int, bool, bool]]:
        if self.policy.window == "count":
            return self.calls[-self.policy.window_size :]
        return [c for c in self.calls if c[0] > int(now // 1) - self.policy.window_size]

    def go(self, state: BreakerState) -> None:
        self.state = state
        if state is HALF_OPEN:
            self.spell += 1
        self.probes = self.probe_results = self.probe_failures = self.probe_slow = 0

    def open(self, now: float) -> None:
        p = self.policy
        wait = min(p.open_seconds * 2.0 ** min(self.opens, 64), p.max_open_seconds)
        if self.opens:
            wait *= 1.0 - 0.2 * self.rng.random()
        self.opens += 1
        self.open_until = now + wait
        self.go(OPEN)

    def close(self) -> None:
        self.calls.clear()
        self.opens = 0
        self.go(CLOSED)

    def visible_state(self, now: float) -> BreakerState:
        if self.state is OPEN and now >= self.open_until:
            return HALF_OPEN
        return self.state

    def admit(self, now: float) -> int | float | None:
        """An int for admitted (the probe token, False if none); else the rejection's
        retry_after (a float, or None)."""
        if self.state in (CLOSED, DISABLED):
            return False
        if self.state is FORCED_OPEN:
            return None
        if self.state is OPEN:
            if now < self.open_until:
                return self.open_until - now
            self.go(HALF_OPEN)
        if self.probes < self.policy.half_open_calls:
            self.probes += 1
            return self.spell
        return HALF_OPEN_RETRY_AFTER

    def record(self, now: float, failed: bool, duration: float, probe: int) -> None:
        p = self.policy
        slow = duration >= p.slow_call_seconds
        if self.state is CLOSED:
            self.calls.append((int(now // 1), failed, slow))
            window = self.window(now)
            n = len(window)
            f = sum(c[1] for c in window)
            s = sum(c[2] for c in window)
            if n >= p.min_calls and (
                (f > 0 and f / n >= p.failure_rate)
                or (p.slow_call_rate < 1.0 and s > 0 and s / n >= p.slow_call_rate)
            ):
                self.open(now)
        elif self.state is HALF_OPEN and probe == self.spell:
            self.probe_results += 1
            self.probe_failures += failed
            self.probe_slow += slow
            n = p.half_open_calls
            f, s = self.probe_failures, self.probe_slow
            if (f > 0 and f / n >= p.failure_rate) or (
                p.slow_call_rate < 1.0 and s > 0 and s / n >= p.slow_call_rate
            ):
                self.open(now)
            elif self.probe_results == n:
                self.close()

    def ignore(self, probe: int) -> None:
        if (
            probe
            and probe == self.spell
            and self.state is HALF_OPEN
            and self.probes > self.probe_results
        ):
            self.probes -= 1


class BreakerMachine(RuleBasedStateMachine):
    admitted = Bundle("admitted")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(50.0)

    @initialize(
        policy=st.builds(
            BreakerPolicy,
            # A policy-disabled breaker would stay disabled for the whole run; the manual
            # rule reaches DISABLED often enough.
            enabled=st.just(True),
            window=st.sampled_from(["count", "time"]),
            window_size=st.integers(1, 6),
            min_calls=st.integers(1, 6),
            failure_rate=st.sampled_from([0.25, 0.5, 2 / 3, 1.0]),
            open_seconds=st.just(5.0),
            max_open_seconds=st.just(17.0),
            half_open_calls=st.integers(1, 3),
            slow_call_seconds=st.just(1.0),
            slow_call_rate=st.sampled_from([0.5, 1.0]),
        ),
        seed=st.integers(0, 2**32),
    )
    def setup(self, policy: BreakerPolicy, seed: int) -> None:
        self.breaker = CircuitBreaker(
            "m", policy, clock=self.clock, random=random.Random(seed).random
        )
        self.model = Model(policy, random.Random(seed))

    @rule(target=admitted)
    def admit(self) -> Any:
        expected = self.model.admit(self.clock.now)
        outcome: int | CircuitOpenError
        try:
            outcome = self.breaker.admit()
        except CircuitOpenError as error:
            outcome = error
        if isinstance(outcome, int):
            assert outcome == expected
            return outcome
        assert not isinstance(expected, int), f"model admitted ({expected})"
        assert outcome.retry_after == (pytest.approx(expected) if expected else expected)
        return multiple()

    # A whole call in one step, so histories reach trips and half-open spells quickly; the
    # split admit / report rules interleave calls that are in flight together.
    @rule(outcome=st.sampled_from(["fail", "ok", "slow", "slow fail", "ignore"]))
    def call(self, outcome: str) -> None:
        if not isinstance(probe := self.admit(), int):
            return
        if outcome == "ignore":
            self.ignore(probe)
        elif outcome.endswith("fail"):
            self.fail(probe, 2.0 if outcome == "slow fail" else 0.0)
        else:
            self.succeed(probe, 4.0 if outcome == "slow" else 0.0)

    @rule(probe=consumes(admitted), duration=st.sampled_from([0.0, 0.5, 1.0, 4.0]))
    def succeed(self, probe: int, duration: float) -> None:
        self.model.record(self.clock.now, False, duration, probe)
        self.breaker.record_success(duration, probe)

    @rule(probe=consumes(admitted), duration=st.sampled_from([0.0, 2.0]))
    def fail(self, probe: int, duration: float) -> None:
        self.model.record(self.clock.now, True, duration, probe)
        self.breaker.record_failure(duration, probe)

    @rule(probe=consumes(admitted), status=st.sampled_from([200, 404, 500, 503]))
    def answer(self, probe: int, status: int) -> None:
        self.model.record(self.clock.now, status >= 500, 0.1, probe)
        self.breaker.record_status(status, 0.1, probe)

    @rule(probe=consumes(admitted))
    def ignore(self, probe: int) -> None:
        self.model.ignore(probe)
        self.breaker.record_ignored(probe)

    # An attempt followed by a retry counts in no rate and gives a probe slot back; a body
    # dropped unread (a finaliser) is an ignored call settled by the next locked operation.
    @rule(probe=consumes(admitted))
    def retried(self, probe: int) -> None:
        self.model.ignore(probe)
        self.breaker.record_retried(0.1, probe)

    @rule(probe=consumes(admitted))
    def dropped(self, probe: int) -> None:
        self.model.ignore(probe)
        self.breaker.record_dropped(probe)

    @rule(seconds=st.sampled_from([5.0, 1.0, 0.25, 12.0, 0.75, 2.5]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.model.state is OPEN)
    @rule(early=st.sampled_from([0.0, 1e-3]))
    def wait_out_the_open_time(self, early: float) -> None:
        self.clock.now = max(self.clock.now, self.model.open_until - early)

    # Most draws are no-ops: operators act rarely, and every action wipes out the history
    # the other rules built up, which would keep the half-open paths barely explored.
    @rule(action=st.sampled_from([*[""] * 8, "force_open", "disable", "force_closed", "reset"]))
    def manual(self, action: str) -> None:
        if not action:
            return
        getattr(self.breaker, action)()
        if action == "force_open":
            self.model.go(FORCED_OPEN)
        elif action == "disable":
            self.model.go(DISABLED)
        else:
            self.model.close()

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "breaker"):
            return
        now = self.clock.now
        model = self.model
        snap = self.breaker.snapshot()
        window = model.window(now)
        state = model.visible_state(now)
        assert snap.state is state
        assert self.breaker.state is state
        assert (snap.calls, snap.failures, snap.slow) == (
            len(window),
            sum(c[1] for c in window),
            sum(c[2] for c in window),
        )
        assert snap.consecutive_opens == model.opens
        if state is OPEN:
            assert snap.open_until == pytest.approx(model.open_until)
        if model.state is HALF_OPEN:
            assert snap.probes_in_flight == model.probes - model.probe_results


TestBreakerAgainstModel = BreakerMachine.TestCase
TestBreakerAgainstModel.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- concurrency ---------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    # Switch threads far more often than the default 5 ms, so races have room to happen.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("window", ["count", "time"])
def test_threads_hammering_one_breaker_lose_no_count(window: str) -> None:
    threads, per_thread = 64, 200
    total = threads * per_thread
    breaker, _ = make(window=window, window_size=total, min_calls=total, failure_rate=0.5)
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            probe = breaker.admit()
            if (index + i) % 4 == 0:
                breaker.record_failure(0.0, probe)
            elif i % 10 == 0:
                breaker.record_ignored(probe)
            else:
                breaker.record_success(0.0, probe)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failures = sum((n + i) % 4 == 0 for n in range(threads) for i in range(per_thread))
    ignored = sum(
        (n + i) % 4 != 0 and i % 10 == 0 for n in range(threads) for i in range(per_thread)
    )
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, total - ignored, failures)


@pytest.mark.implementation
@pytest.mark.usefixtures("busy_switching")
def test_lock_free_successes_keep_a_full_count_window_consistent() -> None:
    # Successes in a full count window skip the lock (they only move the ring position, or
    # write nothing when the window holds successes only). Whatever the interleaving, the
    # totals must match the ring, and the window must still see every failure.
    size, threads, per_thread = 40, 32, 400
    breaker, _ = make(window_size=size, min_calls=size, failure_rate=1.0)
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            probe = breaker.admit()
            if (index * per_thread + i) % 37 == 0:
                breaker.record_failure(0.0, probe)
            else:
                breaker.record_success(0.0, probe)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    window = breaker._window
    assert isinstance(window, _CountWindow)
    assert window.calls == size
    assert window.failures == sum(code & 1 for code in window.ring)
    assert window.slow == sum(code >> 1 for code in window.ring)
    assert breaker.state is CLOSED

    # A window's worth of successes flushes every failure out, and then no success
    # needs to write anything...
    for _ in range(size):
        breaker.record_success(0.0, breaker.admit())
    assert breaker.snapshot().failures == 0
    assert breaker.quiet
    # ...but a failure is still counted, and ends the quiet spell.
    breaker.record_failure(0.0, breaker.admit())
    assert breaker.snapshot().failures == 1
    assert not breaker.quiet


@pytest.mark.usefixtures("busy_switching")
def test_threads_failing_together_trip_the_breaker_exactly_once() -> None:
    threads = 64
    breaker, _ = make(window_size=100, min_calls=100, open_seconds=60.0)
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker.add_listener(lambda _b, old, new: changes.append((old, new)))
    start = threading.Barrier(threads)
    rejected = [0] * threads

    def work(index: int) -> None:
        start.wait()
        for _ in range(50):
            try:
                probe = breaker.admit()
            except CircuitOpenError:
                rejected[index] += 1
                continue
            breaker.record_failure(0.0, probe)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert changes == [(CLOSED, OPEN)]
    assert breaker.state is OPEN
    assert sum(rejected) > 0


def test_a_thousand_tasks_lose_no_count() -> None:
    tasks = 1000
    breaker, _ = make(window_size=tasks, min_calls=tasks, failure_rate=0.5)

    async def call(index: int) -> None:
        probe = breaker.admit()
        await asyncio.sleep(0)  # every task is admitted before any reports
        if index % 3 == 0:
            breaker.record_failure(0.01, probe)
        else:
            breaker.record_success(0.01, probe)

    async def main() -> None:
        await asyncio.gather(*(call(n) for n in range(tasks)))

    asyncio.run(main())
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, tasks, len(range(0, tasks, 3)))


def half_open_breaker(half_open_calls: int) -> CircuitBreaker:
    breaker, clock = make(
        min_calls=2, window_size=2, open_seconds=10.0, half_open_calls=half_open_calls
    )
    trip(breaker)
    clock.advance(10.0)
    return breaker


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("half_open_calls", [1, 3])
def test_concurrent_threads_in_half_open_admit_exactly_the_probes(half_open_calls: int) -> None:
    callers = 20
    breaker = half_open_breaker(half_open_calls)
    start = threading.Barrier(callers)
    results: list[bool | None] = [None] * callers

    def caller(index: int) -> None:
        start.wait()
        try:
            results[index] = breaker.admit()
        except CircuitOpenError:
            results[index] = False

    workers = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results.count(True) == half_open_calls
    assert results.count(False) == callers - half_open_calls
    assert breaker.snapshot().probes_in_flight == half_open_calls


@pytest.mark.parametrize("half_open_calls", [1, 3])
def test_concurrent_tasks_in_half_open_admit_exactly_the_probes(half_open_calls: int) -> None:
    callers = 20
    breaker = half_open_breaker(half_open_calls)

    async def caller(go: asyncio.Event) -> bool:
        await go.wait()
        try:
            probe = breaker.admit()
        except CircuitOpenError:
            return False
        await asyncio.sleep(0)  # the probe is in flight while the others ask
        breaker.record_success(0.01, probe)
        return probe

    async def main() -> list[bool]:
        go = asyncio.Event()
        pending = asyncio.gather(*(caller(go) for _ in range(callers)))
        await asyncio.sleep(0)
        go.set()
        return await pending

    results = asyncio.run(main())
    assert results.count(True) == half_open_calls
    assert breaker.state is CLOSED
