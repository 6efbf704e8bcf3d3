from __future__ import annotations

import calendar
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from functools import partial

import httpx
import pytest
import tenacity
import tenacity.wait
from hypothesis import given
from hypothesis import strategies as st

from gateway_guard import retry
from gateway_guard.errors import (
    CircuitOpenError,
    LoadShedError,
    UpstreamStatusError,
    UpstreamTimeout,
    from_exception,
)
from gateway_guard.policy import RetryPolicy
from gateway_guard.retry import (
    RetryBudget,
    RetryDecision,
    RetrySchedule,
    RetryState,
    is_retryable_exception,
    is_testing,
    never_sent,
    parse_retry_after,
    request_is_replayable,
    set_testing,
    testing,
)
from gateway_guard.testing import FakeClock

FIXED = RetryPolicy(jitter=False, backoff_initial=0.1, backoff_max=2.0, budget_ratio=1.0)
# 1994-11-06 08:49:37 UTC, RFC 9110's example date.
EXAMPLE_DATE = 784111777.0


@pytest.fixture(autouse=True)
def _no_testing_mode() -> Iterator[None]:
    set_testing(False)
    yield
    set_testing(False)


@pytest.fixture
def fixed_rng(monkeypatch: pytest.MonkeyPatch) -> random.Random:
    """tenacity draws its jitter from the ``random`` module; give it a seeded generator."""
    rng = random.Random(1234)
    monkeypatch.setattr(tenacity.wait, "random", rng)
    return rng


def decide(
    policy: RetryPolicy = FIXED,
    budget: RetryBudget | None = None,
    *,
    attempt: int = 1,
    exc: BaseException | None = None,
    status: int | None = 503,
    retry_after: str | None = None,
    remaining: float | None = None,
    replayable: bool = True,
    streaming_body: bool = False,
    next_attempt: float = 0.0,
) -> RetryDecision:
    return RetryState(policy, budget).decide(
        attempt=attempt,
        exc=exc,
        status=None if exc is not None else status,
        retry_after_header=retry_after,
        remaining=remaining,
        replayable=replayable,
        streaming_body=streaming_body,
        next_attempt=next_attempt,
    )


def drive(
    policy: RetryPolicy,
    budget: RetryBudget,
    send: Callable[[], int],
    *,
    method: str = "GET",
) -> tuple[int, RetryDecision | None]:
    """The transports' loop, minus I/O: returns (attempts made, the final denial)."""
    budget.record_call()
    attempt, state = 1, None
    while True:
        exc: httpx.TransportError | None = None
        status: int | None = None
        try:
            status = send()
        except httpx.TransportError as error:
            exc = error
        if exc is None and status not in policy.on_status:
            return attempt, None
        state = state or RetryState(policy, budget)
        decision = state.decide(
            attempt=attempt,
            exc=exc,
            status=status,
            retry_after_header=None,
            remaining=None,
            replayable=request_is_replayable(policy, method, httpx.Headers()),
            streaming_body=False,
        )
        if not decision.retry:
            return attempt, decision
        attempt += 1


# --- schedule ----------------------------------------------------------------------------


def test_backoff_doubles_from_initial_up_to_the_cap() -> None:
    schedule = RetrySchedule(FIXED)
    assert [schedule.wait(n) for n in range(1, 8)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    )


@pytest.mark.parametrize("attempt", [1000, 10**9, 2**70])
@pytest.mark.parametrize("jitter", [False, True])
def test_backoff_is_clamped_for_huge_attempt_numbers(attempt: int, jitter: bool) -> None:
    policy = RetryPolicy(jitter=jitter, backoff_initial=0.1, backoff_max=2.0)
    wait = RetrySchedule(policy).wait(attempt)
    assert 0.0 <= wait <= 2.0
    if not jitter:
        assert wait == 2.0


def test_backoff_with_a_zero_cap_stays_cheap_and_zero() -> None:
    schedule = RetrySchedule(RetryPolicy(backoff_initial=0.5, backoff_max=0.0, jitter=False))
    assert schedule.wait(10**9) == 0.0


def test_backoff_initial_above_the_cap_waits_the_cap() -> None:
    schedule = RetrySchedule(RetryPolicy(backoff_initial=5.0, backoff_max=2.0, jitter=False))
    assert schedule.wait(1) == 2.0


def test_full_jitter_draws_uniformly_below_the_exponential(fixed_rng: random.Random) -> None:
    policy = RetryPolicy(jitter=True, backoff_initial=0.1, backoff_max=2.0)
    schedule = RetrySchedule(policy)
    waits = [schedule.wait(n) for n in range(1, 8)]
    expected_rng = random.Random(1234)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert waits == pytest.approx([expected_rng.uniform(0, c) for c in ceilings])
    assert all(0.0 <= w <= c for w, c in zip(waits, ceilings, strict=True))


@pytest.mark.parametrize(
    "fields",
    [
        {"backoff_initial": -1.0},
        {"backoff_max": math.inf},
        {"backoff_max": math.nan},
    ],
)
def test_schedule_rejects_impossible_numbers(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be a finite number"):
        RetrySchedule(RetryPolicy(**fields))  # type: ignore[arg-type]


@pytest.mark.implementation
def test_schedule_is_built_once_per_policy() -> None:
    a = RetrySchedule.for_policy(RetryPolicy(attempts=4))
    b = RetrySchedule.for_policy(RetryPolicy(attempts=4))
    assert a is b
    assert RetrySchedule.for_policy(RetryPolicy(attempts=5)) is not a
    assert retry._schedule_for.cache_info().maxsize is not None


@given(
    initial=st.floats(0, 100),
    maximum=st.floats(0, 1000),
    jitter=st.booleans(),
    attempt=st.integers(1, 10**6),
)
def test_wait_is_always_within_zero_and_the_cap(
    initial: float, maximum: float, jitter: bool, attempt: int
) -> None:
    policy = RetryPolicy(backoff_initial=initial, backoff_max=maximum, jitter=jitter)
    wait = RetrySchedule(policy).wait(attempt)
    assert 0.0 <= wait <= maximum


@given(
    maximum=st.floats(0, 60),
    jitter=st.booleans(),
    attempt=st.integers(1, 9),
    retry_after=st.integers(0, 100),
)
def test_decision_never_waits_less_than_retry_after(
    maximum: float, jitter: bool, attempt: int, retry_after: int
) -> None:
    policy = RetryPolicy(attempts=10, backoff_max=maximum, jitter=jitter, max_retry_after=50.0)
    decision = decide(policy, attempt=attempt, retry_after=str(retry_after))
    assert decision.retry_after == retry_after
    if retry_after > 50:
        assert (decision.retry, decision.reason) == (False, "retry_after_too_long")
    else:
        assert decision.retry
        assert retry_after <= decision.wait <= max(maximum, retry_after)


# --- the first attempt never touches tenacity --------------------------------------------


@pytest.mark.implementation
def test_a_successful_first_attempt_builds_and_calls_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(*args: object, **kwargs: object) -> float:
        raise AssertionError("tenacity touched on the happy path")

    monkeypatch.setattr(tenacity.wait_exponential, "__call__", explode)
    monkeypatch.setattr(tenacity.wait_random_exponential, "__call__", explode)
    monkeypatch.setattr(RetrySchedule, "__init__", explode)
    monkeypatch.setattr(RetryState, "__init__", explode)
    retry._schedule_for.cache_clear()

    budget = RetryBudget(0.2, 10)
    for method in ("GET", "POST"):
        assert drive(RetryPolicy(), budget, lambda: 200, method=method) == (1, None)
    assert retry._schedule_for.cache_info().currsize == 0


@pytest.mark.implementation
def test_a_denial_before_backoff_is_needed_does_not_touch_tenacity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    original = tenacity.wait_exponential.__call__

    def counting(self: tenacity.wait_exponential, state: tenacity.RetryCallState) -> float:
        calls.append(state.attempt_number)
        return original(self, state)

    monkeypatch.setattr(tenacity.wait_exponential, "__call__", counting)
    retry._schedule_for.cache_clear()
    assert decide(status=500).reason == "not_retryable"
    assert decide(attempt=3).reason == "attempts_exhausted"
    assert decide(replayable=False).reason == "non_idempotent"
    assert calls == []
    assert decide(attempt=2).wait == pytest.approx(0.2)
    assert calls == [2]


# --- budget ------------------------------------------------------------------------------


def test_budget_ratio_allows_a_share_of_calls() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, 0.0, clock=clock)
    for _ in range(100):
        budget.record_call()
    spent = [budget.try_spend() for _ in range(20)]
    assert spent.count(True) == 10
    assert spent[:10] == [True] * 10
    assert budget.counts() == (100, 10)


def test_budget_grows_with_calls_interleaved() -> None:
    budget = RetryBudget(0.1, 0.0, clock=FakeClock())
    allowed = 0
    for _ in range(100):
        budget.record_call()
        allowed += budget.try_spend()
    assert allowed == 10


def test_budget_does_not_lose_a_retry_to_float_rounding() -> None:
    budget = RetryBudget(0.57, 0.0, clock=FakeClock())  # 0.57 * 100 == 56.99999999999999
    for _ in range(100):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(60)) == 57


def test_budget_floor_is_per_second_and_never_saved_up() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.0, 10.0, clock=clock)
    assert sum(budget.try_spend() for _ in range(15)) == 10
    # The last second slides: half of the previous second's retries still count.
    clock.now = 1001.5
    assert sum(budget.try_spend() for _ in range(15)) == 5
    # After a quiet spell the floor is still min_per_second: the seconds nobody retried
    # in are not a reserve to spend at once.
    clock.now = 1010.0
    assert budget.counts() == (0, 5)  # second 1000 has left the window
    assert sum(budget.try_spend() for _ in range(200)) == 10
    clock.now = 1010.999
    assert sum(budget.try_spend() for _ in range(200)) == 0


def test_budget_does_not_spend_a_healthy_windows_allowance_at_the_start_of_an_outage() -> None:
    # 10 s of healthy traffic at 100 calls/s leave 0.1 x 1000 + 10 x 10 = 200 retries
    # unspent in the window. When the upstream starts failing, retries must still come
    # at most at ratio x the call rate + the floor: 10 + 10 a second, not 200 at once.
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.1, 10.0, clock=clock)
    for second in range(10):
        for i in range(100):
            clock.now = 1000.0 + second + i / 100
            budget.record_call()
    per_second = []
    for second in range(10, 20):
        allowed = 0
        for i in range(100):
            clock.now = 1000.0 + second + i / 100
            budget.record_call()
            allowed += budget.try_spend() + budget.try_spend()  # two retries wanted
        per_second.append(allowed)
    assert max(per_second) <= 20
    assert sum(per_second) >= 150  # and the budget is still there to be used


def test_budget_combines_ratio_and_floor() -> None:
    budget = RetryBudget(0.5, 2.0, clock=FakeClock())
    for _ in range(10):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(20)) == 7  # 0.5 * 10 + 2 * 1


def test_budget_window_slides() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.1, 0.0, clock=clock)
    for _ in range(100):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(10)) == 10
    clock.now = 1005.0
    for _ in range(50):
        budget.record_call()
    assert budget.counts() == (150, 10)
    assert sum(budget.try_spend() for _ in range(10)) == 5
    clock.now = 1009.999
    assert budget.counts() == (150, 15)
    clock.now = 1010.0  # second 1000 has left the window
    assert budget.counts() == (50, 5)
    assert not budget.try_spend()
    clock.now = 1015.0
    assert budget.counts() == (0, 0)


@pytest.mark.implementation
def test_budget_memory_is_fixed() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(0.1, 1.0, clock=clock)
    for second in range(10_000):
        clock.now = float(second)
        budget.record_call()
        budget.try_spend()
    assert len(budget._mark_seconds) == len(budget._mark_calls) == 10
    assert len(budget._retry_seconds) == len(budget._retries) == 10


@pytest.mark.parametrize(
    ("ratio", "floor", "window", "message"),
    [
        (-0.1, 1.0, 10.0, "ratio"),
        (math.nan, 1.0, 10.0, "ratio"),
        (0.1, -1.0, 10.0, "min_per_second"),
        (0.1, math.inf, 10.0, "min_per_second"),
        (0.1, 1.0, 0.5, "window"),
        (0.1, 1.0, math.inf, "window"),
        (0.1, 1.0, math.nan, "window"),
    ],
)
def test_budget_rejects_impossible_numbers(
    ratio: float, floor: float, window: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(ratio, floor, window=window)


def test_budget_from_policy() -> None:
    budget = RetryBudget.from_policy(
        RetryPolicy(budget_ratio=0.0, budget_min_per_second=3.0), clock=FakeClock()
    )
    assert sum(budget.try_spend() for _ in range(5)) == 3


def test_budget_holds_exactly_under_64_threads() -> None:
    policy = RetryPolicy(attempts=5, budget_ratio=0.1, budget_min_per_second=0.0)
    budget = RetryBudget.from_policy(policy)
    upstream_calls = 0
    counter_lock = threading.Lock()
    start = threading.Barrier(64)

    def failing_upstream() -> int:
        nonlocal upstream_calls
        with counter_lock:
            upstream_calls += 1
        return 503

    def worker(requests: int) -> None:
        start.wait()
        for _ in range(requests):
            drive(policy, budget, failing_upstream)

    threads = [threading.Thread(target=worker, args=(2 if i < 36 else 1,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.counts()[0] == 100
    assert 100 <= upstream_calls <= 110


def test_budget_never_overspends_under_contention() -> None:
    budget = RetryBudget(0.25, 0.0)
    start = threading.Barrier(64)
    granted = []

    def worker() -> None:
        start.wait()
        mine = 0
        for _ in range(200):
            budget.record_call()
            mine += budget.try_spend()
        granted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls, retries = budget.counts()
    assert calls == 64 * 200
    assert retries == sum(granted) <= 0.25 * calls


# --- idempotency -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "policy", "expected"),
    [
        ("GET", {}, RetryPolicy(), True),
        ("PUT", {}, RetryPolicy(), True),
        ("DELETE", {}, RetryPolicy(), True),
        ("HEAD", {}, RetryPolicy(), True),
        ("OPTIONS", {}, RetryPolicy(), True),
        ("get", {}, RetryPolicy(), True),
        ("POST", {}, RetryPolicy(), False),
        ("PATCH", {}, RetryPolicy(), False),
        ("POST", {"Idempotency-Key": "8e03978e-40d5"}, RetryPolicy(), True),
        ("PATCH", {"idempotency-key": "a"}, RetryPolicy(), True),
        ("POST", {"Idempotency-Key": ""}, RetryPolicy(), False),
        ("POST", {}, RetryPolicy(retry_non_idempotent=True), True),
        ("GET", {}, RetryPolicy(methods=frozenset({"HEAD"})), False),
    ],
)
def test_request_is_replayable(
    method: str, headers: dict[str, str], policy: RetryPolicy, expected: bool
) -> None:
    assert request_is_replayable(policy, method, httpx.Headers(headers)) is expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("slow connect"), True),
        (httpx.PoolTimeout("pool full"), True),
        (httpx.ReadTimeout("slow read"), False),
        (httpx.WriteTimeout("slow write"), False),
        (httpx.RemoteProtocolError("peer closed"), False),
        (httpx.ReadError("reset"), False),
    ],
)
def test_never_sent(exc: BaseException, expected: bool) -> None:
    assert never_sent(exc) is expected


def test_post_is_retried_after_a_connect_failure() -> None:
    decision = decide(exc=httpx.ConnectError("refused"), replayable=False)
    assert (decision.retry, decision.reason) == (True, "error")


def test_post_is_not_retried_after_a_read_timeout() -> None:
    decision = decide(exc=httpx.ReadTimeout("slow"), replayable=False)
    assert (decision.retry, decision.reason) == (False, "non_idempotent")


def test_post_is_not_retried_after_a_failure_status() -> None:
    assert decide(status=503, replayable=False).reason == "non_idempotent"


def test_post_drives_one_attempt_but_post_with_a_key_is_retried() -> None:
    policy = RetryPolicy(attempts=3, budget_ratio=1.0)
    budget = RetryBudget.from_policy(policy, clock=FakeClock())
    attempts, decision = drive(policy, budget, lambda: 503, method="POST")
    assert (attempts, decision) == (1, RetryDecision(False, 0.0, "non_idempotent"))
    attempts, decision = drive(policy, budget, lambda: 503, method="PUT")
    assert attempts == 3
    assert decision is not None
    assert decision.reason == "attempts_exhausted"


# --- retryable outcomes ------------------------------------------------------------------


def _cert_failure() -> httpx.ConnectError:
    exc = httpx.ConnectError("certificate verify failed")
    exc.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("All connection attempts failed"), True),
        (httpx.ConnectTimeout("timed out"), True),
        (httpx.ReadTimeout("timed out"), True),
        (httpx.WriteTimeout("timed out"), True),
        (httpx.PoolTimeout("timed out"), True),
        (httpx.RemoteProtocolError("incomplete chunked read"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
        (httpx.RemoteProtocolError("illegal header line"), True),
        (httpx.ReadError("connection reset"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (UpstreamTimeout("deadline"), True),
        (_cert_failure(), False),
        (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'"), False),
        (httpx.InvalidURL("bad"), False),
        (httpx.LocalProtocolError("bad header"), False),
        (httpx.DecodingError("bad gzip"), False),
        (httpx.TooManyRedirects("loop"), False),
        (CircuitOpenError("open"), False),
        (LoadShedError("shed"), False),
        (UpstreamStatusError("503"), False),
        (ValueError("a bug"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_is_retryable_exception(exc: BaseException, expected: bool) -> None:
    assert is_retryable_exception(exc) is expected


def test_only_listed_statuses_are_retried() -> None:
    assert decide(status=503).reason == "status"
    assert decide(status=500).reason == "not_retryable"
    assert decide(status=429).reason == "not_retryable"
    assert decide(RetryPolicy(on_status=frozenset({429}), jitter=False), status=429).retry
    assert decide(status=None).reason == "not_retryable"


def test_rules_apply_in_order() -> None:
    # Each call breaks every rule from its reason onwards; the earliest one must win.
    wrong = partial(
        decide,
        budget=RetryBudget(0.0, 0.0, clock=FakeClock()),
        exc=httpx.ReadTimeout("slow"),
        retry_after="999",
        remaining=0.0,
        replayable=False,
    )
    assert wrong(attempt=3, streaming_body=True).reason == "attempts_exhausted"
    assert wrong(streaming_body=True).reason == "streaming_body"
    assert wrong(exc=ValueError("bug")).reason == "not_retryable"
    assert wrong().reason == "non_idempotent"
    assert wrong(replayable=True).reason == "retry_after_too_long"
    assert wrong(replayable=True, retry_after=None).reason == "deadline"
    assert wrong(replayable=True, retry_after=None, remaining=None).reason == "budget"


def test_a_retry_after_is_waited_only_when_the_next_attempt_still_has_time() -> None:
    # #15: waiting out a Retry-After that leaves the next attempt no time to even connect
    # makes the visitor wait for nothing; fail fast and pass the Retry-After on instead.
    fits = decide(retry_after="2", remaining=3.5, next_attempt=1.0)
    assert (fits.retry, fits.wait, fits.retry_after) == (True, 2.0, 2.0)
    too_late = decide(retry_after="2", remaining=3.0, next_attempt=1.0)
    assert too_late == RetryDecision(False, 0.0, "deadline", 2.0)
    # Judged on the upstream's value in testing mode too, where the wait itself is 0.
    with testing():
        assert decide(retry_after="2", remaining=3.0, next_attempt=1.0) == too_late
        assert decide(retry_after="2", remaining=3.5, next_attempt=1.0).wait == 0.0
    # A backoff (ours, short) only needs to end before the deadline, as before.
    assert decide(remaining=0.5, next_attempt=1.0).retry


def test_attempts_counts_the_first() -> None:
    policy = RetryPolicy(attempts=3, jitter=False)
    assert decide(policy, attempt=1).retry
    assert decide(policy, attempt=2).retry
    assert decide(policy, attempt=3) == RetryDecision(False, 0.0, "attempts_exhausted")
    assert decide(RetryPolicy(attempts=1), attempt=1).reason == "attempts_exhausted"


def test_a_retry_waits_the_backoff() -> None:
    state = RetryState(FIXED)
    waits = [
        state.decide(
            attempt=n,
            exc=None,
            status=502,
            retry_after_header=None,
            remaining=None,
            replayable=True,
            streaming_body=False,
        ).wait
        for n in (1, 2)
    ]
    assert waits == pytest.approx([0.1, 0.2])


# --- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7\t", 7.0),
        ("000000000000000003", 3.0),
        ("999999999999", 1e9),  # clamped: absurd delays are capped, not refused
        ("Sun, 06 Nov 1994 08:50:07 GMT", 30.0),
        ("Sunday, 06-Nov-94 08:50:07 GMT", 30.0),
        ("Sun Nov  6 08:50:07 1994", 30.0),
        ("sun, 06 nov 1994 08:50:07 gmt", 30.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Sat, 05 Nov 1994 08:49:37 GMT", 0.0),
        ("Sun, 06 Nov 1994 08:50:60 GMT", 82.0),  # leap second read as :59
        ("Sun, 06 Nov 1994 08:50:07 GMT  ", 30.0),
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=EXAMPLE_DATE) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "soon",
        "-5",
        "+5",
        "1.5",
        "1e3",
        "１２",  # noqa: RUF001 -- full-width digits pass str.isdigit()
        "Sun, 06 Nov 1994 08:49:37",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:49:37 GMT",
        "Sun, 06 Nov 1994 08:61:37 GMT",
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun,  6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT\r\nSet-Cookie: x=1",
        "Sun, 06 Nov 1994 08:49:37 GMT" + "\t x" * 10,
        "Sun, 06 Nov 1994 08:49:37 GMT" + "x" * 10_000,
    ],
)
def test_parse_retry_after_rejects_garbage(value: str) -> None:
    assert parse_retry_after(value, now=EXAMPLE_DATE) is None


@pytest.mark.parametrize("value", ["9" * 19, "9" * 5000])
def test_parse_retry_after_clamps_absurd_delays(value: str) -> None:
    # Clamped rather than ignored, so the retry decision fails fast instead of retrying
    # at once against the upstream's wish.
    assert parse_retry_after(value, now=EXAMPLE_DATE) == 1e9


def test_parse_retry_after_two_digit_years_follow_rfc_9110() -> None:
    now = float(calendar.timegm((2025, 6, 1, 0, 0, 0, 0, 0, 0)))
    in_2070 = calendar.timegm((2070, 1, 1, 0, 0, 0, 0, 0, 0))
    # 2070 is less than 50 years ahead, so "70" is 2070; "80" would be 2080, so it is 1980.
    expected = min(in_2070 - now, 1e9)
    assert parse_retry_after("Wednesday, 01-Jan-70 00:00:00 GMT", now=now) == expected
    assert parse_retry_after("Tuesday, 01-Jan-80 00:00:00 GMT", now=now) == 0.0


def test_parse_retry_after_uses_the_wall_clock_by_default() -> None:
    value = formatdate(time.time() + 3600, usegmt=True)
    delay = parse_retry_after(value)
    assert delay is not None
    assert 3500 < delay <= 3600


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf, 1e300])
def test_parse_retry_after_survives_any_now(now: float) -> None:
    delay = parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now=now)
    assert delay is not None
    assert delay >= 0
    assert not math.isnan(delay)


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    delay = parse_retry_after(value, now=EXAMPLE_DATE)
    assert delay is None or (math.isfinite(delay) and delay >= 0)


def test_retry_after_longer_than_backoff_is_waited() -> None:
    decision = decide(retry_after="5")
    assert decision == RetryDecision(True, 5.0, "status", 5.0)


def test_retry_after_shorter_than_backoff_keeps_the_backoff() -> None:
    decision = decide(attempt=2, retry_after="0")
    assert decision.wait == pytest.approx(0.2)
    assert decision.retry_after == 0.0


def test_retry_after_as_a_date() -> None:
    value = formatdate(calendar.timegm((2999, 1, 1, 0, 0, 0, 0, 0, 0)), usegmt=True)
    decision = decide(RetryPolicy(max_retry_after=math.inf, jitter=False), retry_after=value)
    assert decision.retry
    assert decision.wait == decision.retry_after
    assert decision.wait == 1e9  # far-future dates are clamped


def test_retry_after_in_the_past_or_garbage_falls_back_to_backoff() -> None:
    for value in ("Sun, 06 Nov 1994 08:49:37 GMT", "soon", "-3"):
        decision = decide(retry_after=value)
        assert decision.retry
        assert decision.wait == pytest.approx(0.1)


def test_retry_after_above_the_maximum_fails_fast_and_says_how_long() -> None:
    policy = RetryPolicy(max_retry_after=30.0, jitter=False)
    assert decide(policy, retry_after="30").retry
    assert decide(policy, retry_after="31") == RetryDecision(
        False, 0.0, "retry_after_too_long", 31.0
    )
    huge = decide(policy, retry_after="999999999999")
    assert (huge.reason, huge.retry_after) == ("retry_after_too_long", 1e9)


def test_retry_after_is_ignored_when_not_respected() -> None:
    policy = RetryPolicy(respect_retry_after=False, jitter=False)
    assert decide(policy, retry_after="999") == RetryDecision(True, 0.1, "status", None)


# --- deadline and budget order -----------------------------------------------------------


def test_deadline() -> None:
    assert decide(remaining=None).retry
    assert decide(remaining=0.11).retry
    assert decide(remaining=0.1).reason == "deadline"
    assert decide(remaining=0.05).reason == "deadline"
    assert decide(remaining=-1.0).reason == "deadline"
    assert decide(remaining=math.nan).reason == "deadline"


def test_deadline_denial_carries_the_upstreams_retry_after() -> None:
    assert decide(retry_after="10", remaining=5.0) == RetryDecision(False, 0.0, "deadline", 10.0)


def test_budget_is_checked_last_and_only_spent_on_a_retry() -> None:
    budget = RetryBudget(0.0, 1.0, clock=FakeClock())
    assert decide(budget=budget, remaining=0.0).reason == "deadline"
    assert decide(budget=budget, retry_after="999").reason == "retry_after_too_long"
    assert decide(budget=budget, replayable=False).reason == "non_idempotent"
    assert budget.counts() == (0, 0)
    assert decide(budget=budget).retry
    assert budget.counts() == (0, 1)
    assert decide(budget=budget) == RetryDecision(False, 0.0, "budget")


# --- testing mode ------------------------------------------------------------------------


def test_testing_mode_removes_every_wait() -> None:
    set_testing()
    assert is_testing()
    assert decide(attempt=2) == RetryDecision(True, 0.0, "status")
    assert decide(retry_after="20") == RetryDecision(True, 0.0, "status", 20.0)
    # Policy still applies: an over-long Retry-After fails fast in tests too.
    assert decide(retry_after="999").reason == "retry_after_too_long"
    set_testing(False)
    assert not is_testing()
    assert decide(attempt=2).wait == pytest.approx(0.2)


def test_testing_mode_can_cap_attempts() -> None:
    policy = RetryPolicy(attempts=5, jitter=False)
    set_testing(attempts=2)
    assert decide(policy, attempt=1).retry
    assert decide(policy, attempt=2).reason == "attempts_exhausted"
    set_testing(attempts=1)
    assert decide(policy, attempt=1).reason == "attempts_exhausted"
    set_testing(attempts=10)
    assert decide(policy, attempt=5).reason == "attempts_exhausted"


def test_testing_context_manager_restores_the_previous_mode() -> None:
    with testing():
        assert is_testing()
        with testing(attempts=1):
            assert decide().reason == "attempts_exhausted"
        assert is_testing()
        assert decide().retry
        with testing(False):
            assert not is_testing()
        assert is_testing()
    assert not is_testing()


def test_testing_context_manager_restores_on_error() -> None:
    with pytest.raises(RuntimeError), testing():
        raise RuntimeError
    assert not is_testing()


def test_testing_rejects_a_zero_attempt_cap() -> None:
    with pytest.raises(ValueError, match="attempts"):
        set_testing(attempts=0)
    with pytest.raises(ValueError, match="attempts"):
        testing(attempts=0)


# --- surface -----------------------------------------------------------------------------


def test_all_is_sorted_and_complete() -> None:
    assert retry.__all__ == sorted(retry.__all__)
    for name in retry.__all__:
        assert hasattr(retry, name)


def test_decisions_are_immutable() -> None:
    decision = decide()
    with pytest.raises(AttributeError):
        decision.wait = 0.0  # type: ignore[misc]


def test_testing_mode_is_exported_from_gateway_guard_testing() -> None:
    from gateway_guard import testing as testing_pkg

    assert testing_pkg.set_testing is retry.set_testing
    with testing_pkg.testing():
        assert testing_pkg.is_testing()


# --- the classified path (drivers that classify their own client's exceptions) -----------

_REQUEST = httpx.Request("GET", "http://up.test/")


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused", request=_REQUEST),
        httpx.ConnectTimeout("slow connect", request=_REQUEST),
        httpx.PoolTimeout("pool full", request=_REQUEST),
        httpx.ReadTimeout("slow read", request=_REQUEST),
        httpx.ReadError("reset", request=_REQUEST),
        httpx.RemoteProtocolError("peer closed connection", request=_REQUEST),
        httpx.UnsupportedProtocol("ftp://", request=_REQUEST),
        httpx.DecodingError("bad gzip", request=_REQUEST),
    ],
    ids=lambda exc: type(exc).__name__,
)
@pytest.mark.parametrize("replayable", [True, False], ids=["replayable", "not-replayable"])
def test_decide_on_a_classified_error_agrees_with_decide_on_the_exception(
    exc: httpx.TransportError, replayable: bool
) -> None:
    def decide(**kwargs: object) -> RetryDecision:
        return RetryState(FIXED).decide(
            attempt=1,
            remaining=10.0,
            replayable=replayable,
            streaming_body=False,
            **kwargs,  # type: ignore[arg-type]
        )

    classified = decide(error=from_exception(exc), reached=not never_sent(exc))
    assert classified == decide(exc=exc)
