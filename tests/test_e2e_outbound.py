"""End to end: guarded httpx clients against a real misbehaving upstream on loopback.

Every scenario goes through ``guard.client()`` and ``guard.async_client()`` (the ``driver``
fixture) over real sockets to :class:`MisbehavingUpstream` on 127.0.0.1. What reached the
upstream is read from its exact ``stats()``, never inferred from the client side.

Every wait for another thread or task is bounded by ``WAIT``. Timing assertions are
bounds on behaviour with generous margins for a loaded machine (a fail-fast is tens of
microseconds against a bound of a millisecond; a shed call is compared with a 300 ms
upstream), not benchmarks.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest

import gateway_guard as gg
from gateway_guard import retry
from gateway_guard.breaker import HALF_OPEN_RETRY_AFTER, BreakerState
from gateway_guard.context import RequestContext, reset_context, set_context
from gateway_guard.headers import parse_traceparent
from gateway_guard.testing.upstream import MisbehavingUpstream, UpstreamStats

pytestmark = pytest.mark.e2e

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

UP = "up"
# Bounds every wait for a thread, a task or the breaker, so a bug fails instead of hanging.
WAIT = 10.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
# A read timeout meant to expire against `hang`: short, so the tests stay quick.
SHORT_READ = 0.2
# A breaker that never opens in these tests, so it can count calls without interfering.
QUIET_BREAKER = {"window_size": 1000, "min_calls": 1000, "consecutive_timeouts": 0}


def make_guard(upstream: MisbehavingUpstream, **settings: Any) -> gg.Guard:
    """A Guard with upstream ``up`` at the misbehaving upstream; keywords are its settings."""
    routes = settings.pop("routes", [])
    return gg.Guard({"upstreams": {UP: {"base_url": upstream.url, **settings}}, "routes": routes})


def delta(after: UpstreamStats, before: UpstreamStats) -> int:
    return after.requests - before.requests


# --- drivers: the same calls through the sync and the async client -------------------------


@dataclass(frozen=True)
class Req:
    method: str = "GET"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


GET = Req()
POST = Req("POST", "/orders", {"content-type": "application/json"}, b'{"order": 1}')
IDEMPOTENT_POST = Req(
    "POST", "/orders", {**POST.headers, "Idempotency-Key": "order-1-attempt"}, POST.content
)


@dataclass(frozen=True)
class Outcome:
    """One call: its response or the exception it raised, and how long it took."""

    elapsed: float  # seconds, by time.perf_counter()
    response: httpx.Response | None = None
    error: Exception | None = None

    def ok(self) -> httpx.Response:
        assert self.error is None, f"expected a response, got {self.error!r}"
        assert self.response is not None
        return self.response

    def failed(self, cls: type[E]) -> E:
        assert isinstance(self.error, cls), f"expected {cls.__name__}, got {self!r}"
        return self.error


def _send(client: httpx.Client, req: Req) -> Outcome:
    started = time.perf_counter()
    try:
        response = client.request(req.method, req.path, headers=req.headers, content=req.content)
    except Exception as exc:
        return Outcome(time.perf_counter() - started, error=exc)
    return Outcome(time.perf_counter() - started, response=response)


async def _asend(client: httpx.AsyncClient, req: Req) -> Outcome:
    started = time.perf_counter()
    try:
        response = await client.request(
            req.method, req.path, headers=req.headers, content=req.content
        )
    except Exception as exc:
        return Outcome(time.perf_counter() - started, error=exc)
    return Outcome(time.perf_counter() - started, response=response)


ContextFactory = Callable[[gg.Guard], RequestContext]


@contextmanager
def _in_context(guard: gg.Guard, make: ContextFactory | None) -> Iterator[None]:
    # Built only now, right before the calls: an inbound deadline starts ticking at once.
    if make is None:
        yield
        return
    token = set_context(make(guard))
    try:
        yield
    finally:
        reset_context(token)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, WAIT))


class SyncDriver:
    """Calls through ``guard.client()``; concurrency is threads released by a barrier."""

    def phases(
        self,
        guard: gg.Guard,
        counts: Sequence[int],
        req: Req = GET,
        *,
        context: ContextFactory | None = None,
        before: Callable[[int], None] = lambda phase: None,
        transport: Any = None,
    ) -> list[list[Outcome]]:
        """Sequential calls on ONE client, in phases; ``before(i)`` runs before phase i."""
        results: list[list[Outcome]] = []
        with guard.client(UP, transport=transport) as client, _in_context(guard, context):
            for phase, count in enumerate(counts):
                before(phase)
                results.append([_send(client, req) for _ in range(count)])
        return results

    def sequential(
        self,
        guard: gg.Guard,
        count: int,
        req: Req = GET,
        *,
        context: ContextFactory | None = None,
        transport: Any = None,
    ) -> list[Outcome]:
        return self.phases(guard, [count], req, context=context, transport=transport)[0]

    def concurrent(
        self, guard: gg.Guard, count: int, req: Req = GET, *, workers: int | None = None
    ) -> list[Outcome]:
        """``count`` calls from ``workers`` threads (default: one each) sharing one client."""
        workers = workers or count
        assert count % workers == 0
        barrier = threading.Barrier(workers, timeout=WAIT)
        results: list[Outcome] = []
        crashed: list[BaseException] = []
        lock = threading.Lock()
        with guard.client(UP) as client:

            def work() -> None:
                try:
                    barrier.wait()
                    mine = [_send(client, req) for _ in range(count // workers)]
                except BaseException as exc:  # reported below, on the test's thread
                    crashed.append(exc)
                    return
                with lock:
                    results.extend(mine)

            threads = [
                threading.Thread(target=work, name=f"e2e-caller-{i}", daemon=True)
                for i in range(workers)
            ]
            for thread in threads:
                thread.start()
            end = time.monotonic() + WAIT
            for thread in threads:
                thread.join(max(0.0, end - time.monotonic()))
            assert not any(thread.is_alive() for thread in threads), "a caller is stuck"
        assert not crashed, crashed
        return results


class AsyncDriver:
    """Calls through ``guard.async_client()``; concurrency is asyncio tasks."""

    def phases(
        self,
        guard: gg.Guard,
        counts: Sequence[int],
        req: Req = GET,
        *,
        context: ContextFactory | None = None,
        before: Callable[[int], None] = lambda phase: None,
        transport: Any = None,
    ) -> list[list[Outcome]]:
        async def main() -> list[list[Outcome]]:
            results: list[list[Outcome]] = []
            async with guard.async_client(UP, transport=transport) as client:
                with _in_context(guard, context):
                    for phase, count in enumerate(counts):
                        before(phase)
                        results.append([await _asend(client, req) for _ in range(count)])
            return results

        return _run(main())

    def sequential(
        self,
        guard: gg.Guard,
        count: int,
        req: Req = GET,
        *,
        context: ContextFactory | None = None,
        transport: Any = None,
    ) -> list[Outcome]:
        return self.phases(guard, [count], req, context=context, transport=transport)[0]

    def concurrent(
        self, guard: gg.Guard, count: int, req: Req = GET, *, workers: int | None = None
    ) -> list[Outcome]:
        """``count`` tasks sharing one client (``workers`` is for threads; ignored here)."""

        async def main() -> list[Outcome]:
            async with guard.async_client(UP) as client:
                return list(await asyncio.gather(*(_asend(client, req) for _ in range(count))))

        return _run(main())


Driver = SyncDriver | AsyncDriver


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Driver:
    return SyncDriver() if request.param == "sync" else AsyncDriver()


def one(driver: Driver, guard: gg.Guard, req: Req = GET, **kwargs: Any) -> Outcome:
    [outcome] = driver.sequential(guard, 1, req, **kwargs)
    return outcome


# --- 1-4: what is retried, and what is sent only once -------------------------------------


def test_post_answered_503_is_sent_exactly_once(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    upstream.set_mode("status", status=503)
    guard = make_guard(upstream)

    error = one(driver, guard, POST).failed(gg.UpstreamStatusError)

    assert upstream.stats().methods == {"POST": 1}
    assert (error.status, error.received_status, error.proxy_error) == (502, 503, None)
    assert (error.upstream, error.attempts) == (UP, 1)
    assert error.response is not None and error.response.status_code == 503


def test_post_with_idempotency_key_is_retried(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    upstream.set_mode("status", status=503)
    guard = make_guard(upstream, retry={"attempts": 3})

    error = one(driver, guard, IDEMPOTENT_POST).failed(gg.UpstreamStatusError)

    assert upstream.stats().methods == {"POST": 3}
    assert (error.status, error.received_status, error.attempts) == (502, 503, 3)


def test_refused_post_is_retried_because_it_was_never_sent(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    upstream.set_mode("refuse")
    guard = make_guard(upstream, retry={"attempts": 3})

    error = one(driver, guard, POST).failed(gg.UpstreamConnectError)

    assert upstream.stats() == UpstreamStats(connections=0, requests=0, methods={})
    assert (error.status, error.proxy_error, error.attempts) == (502, "connection_refused", 3)
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert guard.breaker(UP).snapshot().failures == 1  # one call, judged by its last attempt


@pytest.mark.parametrize(("req", "attempts"), [(POST, 1), (GET, 3)], ids=["POST", "GET"])
def test_read_timeout_retried_only_when_idempotent(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None, req: Req, attempts: int
) -> None:
    # The request reached a hung upstream: a POST may have been acted on, a GET is safe.
    upstream.set_mode("hang")
    guard = make_guard(
        upstream, read_timeout=SHORT_READ, retry={"attempts": 3}, breaker=QUIET_BREAKER
    )

    outcome = one(driver, guard, req)

    error = outcome.failed(gg.UpstreamTimeout)
    assert upstream.stats().methods == {req.method: attempts}
    assert (error.status, error.proxy_error) == (504, "connection_read_timeout")
    assert error.attempts == attempts
    assert isinstance(error.__cause__, httpx.ReadTimeout)
    assert outcome.elapsed >= SHORT_READ * attempts
    # One failure per call (the `hang` row of the failure-mode table below).
    snapshot = guard.breaker(UP).snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


# --- 5: the retry budget ----------------------------------------------------------------------

BUDGET = {
    "retry": {"attempts": 3, "budget_ratio": 0.1, "budget_min_per_second": 0},
    "breaker": {"enabled": False},
}
BUDGET_CALLS = 100


@pytest.mark.parametrize("shape", ["sequential", "concurrent"])
def test_retry_budget_caps_the_load_on_a_failing_upstream(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None, shape: str
) -> None:
    upstream.set_mode("status", status=503)
    guard = make_guard(upstream, **BUDGET)

    if shape == "sequential":
        outcomes = driver.sequential(guard, BUDGET_CALLS)
    else:  # 10 threads x 10 calls (sync), 100 tasks (async)
        outcomes = driver.concurrent(guard, BUDGET_CALLS, workers=10)

    errors = [outcome.failed(gg.UpstreamStatusError) for outcome in outcomes]
    assert len(errors) == BUDGET_CALLS
    assert all(error.received_status == 503 for error in errors)
    requests = upstream.stats().requests
    # Without the budget: 300 requests. With 10% of 100 calls: at most 10 retries.
    assert BUDGET_CALLS <= requests <= BUDGET_CALLS * 1.1
    calls, retries = guard.runtime(UP).budget.counts()
    assert (calls, requests) == (BUDGET_CALLS, BUDGET_CALLS + retries)
    assert sum(error.attempts for error in errors) == requests


# --- 6: the breaker: open fails fast, half-open admits exactly the probes ----------------------

OPEN_SECONDS = 0.5
HALF_OPEN_CALLS = 3
TRIPPY = {
    "retry": {"attempts": 1},
    "breaker": {
        "window_size": 4,
        "min_calls": 4,
        "open_seconds": OPEN_SECONDS,
        "half_open_calls": HALF_OPEN_CALLS,
    },
}
FAST_FAIL_CALLS = 200
CALLERS = 20
# Long enough that every caller reaches the breaker while the probes are still out.
PROBE_DELAY_MS = 300


def wait_until_half_open(breaker: gg.CircuitBreaker) -> None:
    give_up = time.monotonic() + OPEN_SECONDS + WAIT
    while breaker.state is not BreakerState.HALF_OPEN:
        assert time.monotonic() < give_up, f"breaker stuck in {breaker.state}"
        time.sleep(0.02)


def test_open_breaker_fails_fast_then_admits_exactly_the_probes(
    driver: Driver,
    upstream: MisbehavingUpstream,
    request: pytest.FixtureRequest,
) -> None:
    upstream.set_mode("status", status=500)
    guard = make_guard(upstream, **TRIPPY)
    breaker = guard.breaker(UP)
    seen: list[UpstreamStats] = []

    def before(phase: int) -> None:
        if phase == 1:
            assert breaker.state is BreakerState.OPEN
            seen.append(upstream.stats())

    # One client for both phases, so nothing slow happens between tripping and timing.
    tripping, fast = driver.phases(guard, [4, FAST_FAIL_CALLS], before=before)

    assert [o.failed(gg.UpstreamStatusError).received_status for o in tripping] == [500] * 4
    assert seen[0].requests == 4
    assert upstream.stats() == seen[0]  # the 200 rejected calls never reached it
    errors = [outcome.failed(gg.CircuitOpenError) for outcome in fast]
    for error in errors:
        assert (error.status, error.proxy_error, error.upstream) == (
            503,
            "destination_unavailable",
            UP,
        )
        assert error.attempts == 0
        assert error.retry_after is not None and 0 < error.retry_after <= OPEN_SECONDS
    timings = sorted(outcome.elapsed for outcome in fast)
    median = statistics.median(timings)
    # Kept with the test's report (junit XML, plugins) for whoever watches the numbers.
    request.node.user_properties += [
        ("fast_fail_median_us", round(median * 1e6, 1)),
        ("fast_fail_p90_us", round(timings[int(len(timings) * 0.9)] * 1e6, 1)),
        ("fast_fail_max_us", round(timings[-1] * 1e6, 1)),
    ]
    assert median < 0.001, f"median fast-fail {median * 1e6:.0f} us"

    # Half-open: of 20 simultaneous callers exactly the probes reach the upstream.
    upstream.set_mode("slow", delay_ms=PROBE_DELAY_MS)
    wait_until_half_open(breaker)
    before_probes = upstream.stats()

    outcomes = driver.concurrent(guard, CALLERS)

    assert delta(upstream.stats(), before_probes) == HALF_OPEN_CALLS
    probes = [o.ok() for o in outcomes if o.error is None]
    assert [response.status_code for response in probes] == [200] * HALF_OPEN_CALLS
    rejected = [o.failed(gg.CircuitOpenError) for o in outcomes if o.error is not None]
    assert len(rejected) == CALLERS - HALF_OPEN_CALLS
    assert all(error.retry_after == HALF_OPEN_RETRY_AFTER for error in rejected)
    assert breaker.state is BreakerState.CLOSED

    # Closed again: calls flow.
    upstream.set_mode("ok")
    before_flow = upstream.stats()
    flowing = driver.sequential(guard, 5)
    assert [o.ok().status_code for o in flowing] == [200] * 5
    assert delta(upstream.stats(), before_flow) == 5
    assert breaker.state is BreakerState.CLOSED


# --- 7: deadlines -------------------------------------------------------------------------------

DEADLINE = 0.5
# How late past the deadline a call may end on a loaded machine; far below read_timeout.
DEADLINE_MARGIN = 0.4
DEADLINE_PATH = "/deadline/report"
# An upstream deadline shorter than its own timeouts is refused at startup
# (test_timeouts_longer_than_the_upstream_deadline_are_refused), so the 0.5 s deadline
# comes from where it does in production: a route's policy or the inbound request.
DEADLINE_SETTINGS = {
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "routes": [{"path": "/deadline/{rest:path}", "deadline": DEADLINE}],
}


def route_deadline(guard: gg.Guard) -> RequestContext:
    route = guard.policies.routes.resolve("GET", DEADLINE_PATH)[1]
    assert route is not None
    return RequestContext(guard, "req-deadline", route=route)


def inbound_deadline(guard: gg.Guard) -> RequestContext:
    return RequestContext(guard, "req-deadline", deadline_at=guard.clock() + DEADLINE)


DEADLINE_SOURCES = [
    pytest.param(route_deadline, id="route"),
    pytest.param(inbound_deadline, id="inbound"),
]


def test_timeouts_longer_than_the_upstream_deadline_are_refused(
    upstream: MisbehavingUpstream,
) -> None:
    with pytest.raises(gg.SettingsError, match=r"upstreams\.up\.read_timeout"):
        make_guard(upstream, connect_timeout=0.5, read_timeout=1.0, deadline=DEADLINE)


@pytest.mark.parametrize("context", DEADLINE_SOURCES)
def test_deadline_cuts_a_slow_attempt(
    driver: Driver, upstream: MisbehavingUpstream, context: ContextFactory
) -> None:
    upstream.set_mode("slow", delay_ms=800)  # slower than the deadline, within read_timeout
    guard = make_guard(upstream, **DEADLINE_SETTINGS)

    outcome = one(driver, guard, Req(path=DEADLINE_PATH), context=context)

    error = outcome.failed(gg.UpstreamTimeout)
    # The 1 s read_timeout never expired: the deadline did (DESIGN §5, docs/settings.md).
    assert (error.status, error.proxy_error) == (504, "http_response_timeout")
    assert isinstance(error.__cause__, httpx.ReadTimeout)
    assert DEADLINE - 0.05 <= outcome.elapsed <= DEADLINE + DEADLINE_MARGIN
    assert error.elapsed <= DEADLINE + DEADLINE_MARGIN
    assert error.attempts == 1
    assert upstream.stats().requests == 1


def test_call_that_fits_in_the_deadline_is_not_cut(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("slow", delay_ms=400)
    guard = make_guard(upstream, **DEADLINE_SETTINGS)

    outcome = one(driver, guard, Req(path=DEADLINE_PATH), context=route_deadline)

    assert outcome.ok().status_code == 200
    assert outcome.elapsed < DEADLINE + DEADLINE_MARGIN


def test_retries_never_outlast_the_deadline(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    # Each attempt takes 200 ms; ten are allowed, the deadline leaves room for about 2.5.
    upstream.set_mode("status", status=503, delay_ms=200)
    guard = make_guard(upstream, **DEADLINE_SETTINGS, retry={"attempts": 10})

    outcome = one(driver, guard, Req(path=DEADLINE_PATH), context=route_deadline)

    # Whether the deadline runs out during the third attempt (a 504) or just after the
    # second answered 503 (the upstream's answer, 502) depends on the machine's speed.
    error = outcome.failed(gg.UpstreamError)
    if isinstance(error, gg.UpstreamTimeout):
        assert (error.status, error.proxy_error) == (504, "http_response_timeout")
    else:
        assert isinstance(error, gg.UpstreamStatusError)
        assert (error.status, error.received_status) == (502, 503)
    assert outcome.elapsed <= DEADLINE + DEADLINE_MARGIN
    assert error.elapsed <= DEADLINE + DEADLINE_MARGIN
    # The first two attempts were answered; a last one cut short may not have been sent.
    assert 2 <= upstream.stats().requests <= error.attempts


# --- 8: Retry-After -----------------------------------------------------------------------------


def test_retry_after_is_honoured_with_real_time(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    assert not retry.is_testing()  # real waits: no_backoff is deliberately not used
    upstream.set_mode("status", status=503, retry_after="1")
    guard = make_guard(upstream, retry={"attempts": 2})

    outcome = one(driver, guard)

    error = outcome.failed(gg.UpstreamStatusError)
    assert upstream.stats().requests == 2
    assert (error.attempts, error.received_status, error.retry_after) == (2, 503, 1.0)
    # The second attempt went out no sooner than the upstream asked, and not much later.
    assert 1.0 <= outcome.elapsed < 1.0 + 1.5


def test_retry_after_above_the_maximum_fails_fast(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    assert not retry.is_testing()
    upstream.set_mode("status", status=503, retry_after="60")
    guard = make_guard(upstream, retry={"attempts": 2, "max_retry_after": 30})

    outcome = one(driver, guard)

    error = outcome.failed(gg.UpstreamStatusError)
    assert outcome.elapsed < 0.5
    assert error.retry_after == 60
    assert (error.attempts, error.received_status) == (1, 503)
    assert upstream.stats().requests == 1


# --- 9: the bulkhead -----------------------------------------------------------------------------


def test_bulkhead_sheds_the_excess_at_once(driver: Driver, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("slow", delay_ms=300)
    guard = make_guard(upstream, bulkhead={"max_concurrent": 2})

    outcomes = driver.concurrent(guard, 6)

    served = [o for o in outcomes if o.error is None]
    shed = [o for o in outcomes if o.error is not None]
    assert [o.ok().status_code for o in served] == [200, 200]
    assert all(o.elapsed >= 0.3 for o in served)
    assert len(shed) == 4
    for outcome in shed:
        error = outcome.failed(gg.LoadShedError)
        assert (error.status, error.proxy_error, error.upstream) == (
            503,
            "connection_limit_reached",
            UP,
        )
        assert error.attempts == 0
        assert error.retry_after is not None and error.retry_after >= 1
        # Microseconds in fact; the bound leaves room for a loaded machine and is still
        # well below the 300 ms a slot is held.
        assert outcome.elapsed < 0.2, "a shed call must not wait for a slot"
    assert upstream.stats().requests == 2
    assert guard.bulkhead(UP).in_flight == 0


# --- 10: every failure mode, classified through the whole guard ----------------------------------


@dataclass(frozen=True)
class Failure:
    mode: str
    error: type[gg.UpstreamError]
    status: int
    proxy_error: str | None
    attempts: int
    requests: int  # how many reached the upstream
    cause: tuple[type[BaseException], ...] = ()  # empty: no cause, the upstream answered
    received_status: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # of the mode


def answered(status: int, attempts: int) -> Failure:
    return Failure(
        "status",
        gg.UpstreamStatusError,
        502,
        None,
        attempts=attempts,
        requests=attempts,
        received_status=status,
        options={"status": status},
    )


FAILURES = [
    Failure(
        "refuse",
        gg.UpstreamConnectError,
        502,
        "connection_refused",
        attempts=3,
        requests=0,
        cause=(httpx.ConnectError,),
    ),
    # `hang` (504 connection_read_timeout, ReadTimeout, one failure per attempt) is
    # test_read_timeout_retried_only_when_idempotent: the same GET, not paid for twice.
    # An RST after the request: a read error, or on some stacks "disconnected without
    # sending a response".
    Failure(
        "reset",
        gg.UpstreamProtocolError,
        502,
        "connection_terminated",
        attempts=3,
        requests=3,
        cause=(httpx.ReadError, httpx.RemoteProtocolError),
    ),
    Failure(
        "garbage",
        gg.UpstreamProtocolError,
        502,
        "http_protocol_error",
        attempts=3,
        requests=3,
        cause=(httpx.RemoteProtocolError,),
    ),
    # The headers said 200, then the body breaks off: a GET's body is read within the
    # attempt, so it is retried like any other failure, and counts once, as a failure.
    Failure(
        "truncated",
        gg.UpstreamProtocolError,
        502,
        "http_response_incomplete",
        attempts=3,
        requests=3,
        cause=(httpx.RemoteProtocolError,),
    ),
    # 500 is a failure but not in retry.on_status: answered once, raised at once.
    answered(500, attempts=1),
    answered(502, attempts=3),
    answered(503, attempts=3),
]


@pytest.mark.parametrize(
    "case", FAILURES, ids=[f"{f.mode}{f.options.get('status', '')}" for f in FAILURES]
)
def test_failure_modes_are_classified_and_counted_once_per_call(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None, case: Failure
) -> None:
    upstream.set_mode(case.mode, **case.options)
    guard = make_guard(upstream, retry={"attempts": 3}, breaker=QUIET_BREAKER)

    error = one(driver, guard).failed(gg.UpstreamError)

    assert type(error) is case.error
    assert (error.status, error.proxy_error) == (case.status, case.proxy_error)
    assert error.received_status == case.received_status
    assert (error.upstream, error.attempts) == (UP, case.attempts)
    assert error.elapsed > 0
    if case.cause:
        assert isinstance(error.__cause__, case.cause), repr(error.__cause__)
    else:
        assert isinstance(error, gg.UpstreamStatusError)
        assert error.response is not None
        assert error.response.status_code == case.received_status
        assert error.response.is_closed
    assert upstream.stats().requests == case.requests
    snapshot = guard.breaker(UP).snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)
    assert guard.bulkhead(UP).in_flight == 0


# --- 11: request id and trace propagation ----------------------------------------------------------


def echoed_headers(body: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in body["raw_headers"] if key.lower() == name]


def test_request_id_and_traceparent_reach_the_upstream(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    guard = make_guard(upstream)

    def context(guard: gg.Guard) -> RequestContext:
        return RequestContext(guard, "req-e2e-42", trace_id=TRACE_ID)

    first, second = driver.sequential(guard, 2, context=context)

    parents = []
    for outcome in (first, second):
        echo = outcome.ok().json()
        assert echoed_headers(echo, "x-request-id") == ["req-e2e-42"]
        [traceparent] = echoed_headers(echo, "traceparent")
        parsed = parse_traceparent(traceparent)
        assert parsed is not None, traceparent
        trace_id, parent_id, flags = parsed
        assert (trace_id, flags) == (TRACE_ID, "01")
        parents.append(parent_id)
    # Each outbound call is its own span of the caller's trace.
    assert parents[0] != parents[1]


def test_trace_is_started_when_the_inbound_request_had_none(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    guard = make_guard(upstream)

    def context(guard: gg.Guard) -> RequestContext:
        return RequestContext(guard, "req-no-trace")

    echo = one(driver, guard, context=context).ok().json()

    assert echoed_headers(echo, "x-request-id") == ["req-no-trace"]
    [traceparent] = echoed_headers(echo, "traceparent")
    assert parse_traceparent(traceparent) is not None, traceparent


def test_request_id_survives_retries(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    upstream.set_mode("status", status=503)  # answers with the JSON echo
    guard = make_guard(upstream, retry={"attempts": 3})

    def context(guard: gg.Guard) -> RequestContext:
        return RequestContext(guard, "req-retried", trace_id=TRACE_ID)

    error = one(driver, guard, context=context).failed(gg.UpstreamStatusError)

    assert error.attempts == 3
    assert error.response is not None
    last = error.response.json()  # what the third attempt carried
    assert last["request_number"] == 3
    assert echoed_headers(last, "x-request-id") == ["req-retried"]
    [traceparent] = echoed_headers(last, "traceparent")
    parsed = parse_traceparent(traceparent)
    assert parsed is not None and parsed[0] == TRACE_ID


def test_nothing_is_propagated_outside_a_request(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    guard = make_guard(upstream)

    echo = one(driver, guard).ok().json()

    assert "x-request-id" not in echo["headers"]
    assert "traceparent" not in echo["headers"]


# --- 12: keep-alive --------------------------------------------------------------------------------


def test_connections_are_reused(driver: Driver, upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream)

    outcomes = driver.sequential(guard, 50)

    assert [o.ok().status_code for o in outcomes] == [200] * 50
    stats = upstream.stats()
    assert stats.requests == 50
    assert stats.connections <= 2


def test_connections_are_reused_after_final_failure_statuses(
    driver: Driver, upstream: MisbehavingUpstream
) -> None:
    # The guard reads (a capped part of) a failure body before raising: the connection
    # goes back to the pool.
    upstream.set_mode("status", status=500)
    guard = make_guard(upstream, breaker={"enabled": False})

    outcomes = driver.sequential(guard, 20)

    assert all(o.failed(gg.UpstreamStatusError).received_status == 500 for o in outcomes)
    stats = upstream.stats()
    assert stats.requests == 20
    assert stats.connections <= 2


def test_connections_are_reused_across_retries(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    # A retried failure response is drained (a small body) before the retry, so its
    # connection goes back to the pool rather than costing the upstream a new handshake.
    upstream.set_mode("status", status=503)
    # A budget that allows every retry: 20 of them within a second.
    retries = {"attempts": 3, "budget_min_per_second": 1000}
    guard = make_guard(upstream, retry=retries, breaker={"enabled": False})

    outcomes = driver.sequential(guard, 10)

    assert all(o.failed(gg.UpstreamStatusError).attempts == 3 for o in outcomes)
    stats = upstream.stats()
    assert stats.requests == 30
    assert stats.connections <= 2, stats  # closed unread, it was one per retry: 21


# --- 12: a body that breaks off after the headers (issue #15, defect 6) ----------------------


class SwitchToOk(httpx.HTTPTransport):
    """httpx's own transport (sockets, pool, deadlines as ever), switching the upstream to
    ``ok`` once the first answer's headers arrived: the next attempt gets a whole answer."""

    def __init__(self, upstream: MisbehavingUpstream) -> None:
        super().__init__()
        self._upstream = upstream
        self._first = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self._first:
            self._first = False
            self._upstream.set_mode("ok")
        return response


class AsyncSwitchToOk(httpx.AsyncHTTPTransport):
    def __init__(self, upstream: MisbehavingUpstream) -> None:
        super().__init__()
        self._upstream = upstream
        self._first = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if self._first:
            self._first = False
            self._upstream.set_mode("ok")  # the upstream's own loop: a short blocking call
        return response


def switch_to_ok(driver: Driver, upstream: MisbehavingUpstream) -> Any:
    return SwitchToOk(upstream) if isinstance(driver, SyncDriver) else AsyncSwitchToOk(upstream)


# (mode, its options, the guard's settings): an answer whose body never arrives whole.
BROKEN_BODIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "truncated": ("truncated", {}, {}),
    # A byte every 2 s: the first body read outlasts the read timeout.
    "stalled": ("drip_body", {"drip_ms": 2000}, {"read_timeout": SHORT_READ}),
}


@pytest.mark.parametrize("case", list(BROKEN_BODIES))
@pytest.mark.parametrize("req", [GET, IDEMPOTENT_POST], ids=["GET", "POST-with-key"])
def test_body_breaking_off_is_retried_when_replayable(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None, case: str, req: Req
) -> None:
    mode, options, settings = BROKEN_BODIES[case]
    upstream.set_mode(mode, **options)
    guard = make_guard(upstream, retry={"attempts": 3}, breaker=QUIET_BREAKER, **settings)

    outcome = one(driver, guard, req, transport=switch_to_ok(driver, upstream))

    assert outcome.ok().json()["mode"] == "ok"
    assert upstream.stats().methods == {req.method: 2}
    assert outcome.elapsed < 1.5  # not the 2 s of the next dripped byte
    snapshot = guard.breaker(UP).snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)
    assert guard.bulkhead(UP).in_flight == 0


@pytest.mark.parametrize("case", list(BROKEN_BODIES))
def test_body_breaking_off_is_never_sent_twice_for_a_post(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None, case: str
) -> None:
    mode, options, settings = BROKEN_BODIES[case]
    upstream.set_mode(mode, **options)
    guard = make_guard(upstream, retry={"attempts": 3}, breaker=QUIET_BREAKER, **settings)

    error = one(driver, guard, POST, transport=switch_to_ok(driver, upstream)).failed(
        gg.UpstreamError
    )

    assert isinstance(error, gg.UpstreamProtocolError | gg.UpstreamTimeout)
    assert error.attempts == 1
    assert upstream.stats().methods == {"POST": 1}
    assert guard.breaker(UP).snapshot().failures == 1


def test_body_dripping_past_the_deadline_ends_at_the_deadline(
    driver: Driver, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    # Every read is well inside the read timeout: only the deadline stops it, and with
    # no time left there is no retry.
    upstream.set_mode("drip_body", drip_ms=100)
    guard = make_guard(upstream, retry={"attempts": 3}, read_timeout=0.5, deadline=1.0)

    outcome = one(driver, guard)

    error = outcome.failed(gg.UpstreamTimeout)
    assert (error.status, error.proxy_error) == (504, "http_response_timeout")
    assert 0.9 < outcome.elapsed < 2.0
    assert upstream.stats().requests == 1


class ResetMidBody:
    """A raw HTTP/1.1 upstream on 127.0.0.1 whose first answer promises 100 bytes, sends 7,
    then resets the connection (TCP RST); later answers are whole. (MisbehavingUpstream's
    ``reset`` resets before any answer.) One connection at a time, which is all a
    sequential client uses."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.methods: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="reset-mid-body", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> ResetMidBody:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(WAIT)
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            (
                int(line.partition(":")[2])
                for line in lines
                if line.lower().startswith("content-length:")
            ),
            0,
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.methods.append(lines[0].split(" ")[0])
        if len(self.methods) == 1:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            time.sleep(0.2)  # the client has the headers, and waits for the rest
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


@pytest.mark.parametrize(
    ("req", "sent"), [(GET, ["GET", "GET"]), (POST, ["POST"])], ids=["GET", "POST"]
)
def test_connection_reset_mid_body(
    driver: Driver, no_backoff: None, req: Req, sent: list[str]
) -> None:
    with ResetMidBody() as server:
        guard = gg.Guard({"upstreams": {UP: {"base_url": server.url}}})
        outcome = one(driver, guard, req)

    if req is GET:
        assert outcome.ok().content == b"hello"
    else:
        error = outcome.failed(gg.UpstreamProtocolError)
        assert isinstance(error.__cause__, httpx.ReadError | httpx.RemoteProtocolError)
    assert server.methods == sent
