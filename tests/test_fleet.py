"""The fleet store (``[state] backend = "redis"``) against a real redis-server.

Each ``Guard`` here has its own store, process id and connections, exactly as a worker
process would; they share one Redis. Calls are driven through the breaker's own API (the
drivers are covered elsewhere); tests/test_e2e_fleet.py runs real worker processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway_guard as gg
from gateway_guard import BreakerState, SettingsError
from gateway_guard.policy import BreakerPolicy
from gateway_guard.testing import FakeClock
from redis_server import RedisServer, redis_binary, redis_server

BREAKER = {
    "min_calls": 10,
    "window_size": 20,
    "failure_rate": 0.5,
    "open_seconds": 1.0,
    "half_open_calls": 3,
    "consecutive_timeouts": 0,
}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def settings(url: str, prefix: str, **retry: Any) -> dict[str, Any]:
    return {
        "service": "shop",
        "state": {"backend": "redis", "redis_url": url, "key_prefix": prefix},
        "upstreams": {
            "pay": {
                "base_url": "http://127.0.0.1:9",
                "breaker": BREAKER,
                **({"retry": retry} if retry else {}),
            }
        },
    }


@pytest.fixture
def fleet(server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Callable[..., gg.Guard]]:
    """Make Guards (one per simulated process) on a prefix of this test's own."""
    guards: list[gg.Guard] = []
    prefix = f"test:{request.node.name}:{time.monotonic_ns()}"

    def make(**retry: Any) -> gg.Guard:
        guard = gg.Guard(settings(server.url, prefix, **retry))
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        guard.close()


def until(condition: Callable[[], bool], timeout: float = 2.0) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - start


def connected(*guards: gg.Guard) -> None:
    until(lambda: all(g._store is not None and g._store.connected for g in guards))


def fail(breaker: gg.CircuitBreaker) -> None:
    probe = breaker.admit()
    breaker.record_failure(0.01, probe)


def succeed(breaker: gg.CircuitBreaker) -> None:
    probe = breaker.admit()
    breaker.record_success(0.01, probe)


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://localhost:6379", "redis://", "redis://host:99999/0", "redis://host/zero", "x y"],
)
def test_a_bad_redis_url_names_the_key(url: str) -> None:
    with pytest.raises(SettingsError, match=r"state\.redis_url"):
        gg.Guard({"state": {"redis_url": url}})


def test_state_settings_are_bounded_and_checked() -> None:
    with pytest.raises(SettingsError, match=r"state\.command_timeout"):
        gg.Guard({"state": {"command_timeout": 60.0}})
    with pytest.raises(SettingsError, match=r"state\.backend"):
        gg.Guard({"state": {"backend": "memcached"}})
    with pytest.raises(SettingsError, match=r"state\.key_prefix"):
        gg.Guard({"state": {"key_prefix": "a b"}})
    assert gg.Guard({}).settings.state.backend == "local"


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    with pytest.raises(SettingsError, match=r"state\.backend.*gateway-guard\[redis\]"):
        gg.Guard({"state": {"backend": "redis"}})


def test_importing_gateway_guard_never_imports_redis() -> None:
    code = "import sys, gateway_guard as gg; gg.Guard({}); print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


# --- the breaker, fleet-wide ---------------------------------------------------------------


def test_the_fleet_opens_on_its_failure_rate_and_every_process_follows(
    fleet: Callable[..., gg.Guard],
) -> None:
    a, b, c = fleet(), fleet(), fleet()
    connected(a, b, c)
    breakers = [g.breaker("pay") for g in (a, b, c)]
    calls = 0
    # Failures spread over three processes, at a pace the background sharing can follow:
    # none of them alone reaches min_calls (10), the fleet does.
    while not all(br.state is BreakerState.OPEN for br in breakers):
        # One process alone needs 10; three on their own would need up to 30.
        assert calls < 15, f"{calls} calls and not every breaker is open"
        breaker = breakers[calls % 3]
        if breaker.state is BreakerState.CLOSED:
            fail(breaker)
            calls += 1
        time.sleep(0.03)
    assert 10 <= calls < 15


def test_one_sick_process_does_not_open_a_healthy_fleet(fleet: Callable[..., gg.Guard]) -> None:
    guards = [fleet() for _ in range(4)]
    connected(*guards)
    sick, *healthy = (g.breaker("pay") for g in guards)
    for _ in range(20):
        for breaker in healthy:
            succeed(breaker)
    time.sleep(2.2)  # healthy counts reach every process within two heartbeats
    for _ in range(20):
        fail(sick)  # alone this would open at once: 20 of 20 failed
    time.sleep(0.3)
    assert sick.state is BreakerState.CLOSED
    assert all(b.state is BreakerState.CLOSED for b in healthy)
    assert sick.snapshot().failure_rate == 1.0


def test_manual_control_applies_fleet_wide_within_a_second(
    fleet: Callable[..., gg.Guard],
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    theirs = b.breaker("pay")
    for action, state in (
        ("force_open", BreakerState.FORCED_OPEN),
        ("disable", BreakerState.DISABLED),
        ("force_closed", BreakerState.CLOSED),
        ("force_open", BreakerState.FORCED_OPEN),
        ("reset", BreakerState.CLOSED),
    ):
        getattr(a.breaker("pay"), action)()
        assert until(lambda state=state: theirs.state is state, 1.0) < 1.0


def test_exactly_half_open_calls_probes_fleet_wide(fleet: Callable[..., gg.Guard]) -> None:
    guards = [fleet() for _ in range(3)]
    connected(*guards)
    breakers = [g.breaker("pay") for g in guards]
    guards[0].breaker("pay").force_closed()
    for _ in range(10):
        fail(breakers[0])
    until(lambda: all(b.state is BreakerState.OPEN for b in breakers))
    time.sleep(1.05)  # open_seconds
    admitted: list[tuple[gg.CircuitBreaker, int]] = []
    for _ in range(5):
        for breaker in breakers:
            with contextlib.suppress(gg.CircuitOpenError):
                admitted.append((breaker, breaker.admit()))
    assert len(admitted) == 3  # half_open_calls, across the three processes
    for breaker, probe in admitted:
        breaker.record_success(0.01, probe)
    until(lambda: all(b.state is BreakerState.CLOSED for b in breakers), 1.0)


def test_failed_probes_reopen_the_fleet(fleet: Callable[..., gg.Guard]) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    a.breaker("pay").force_closed()
    for _ in range(10):
        fail(a.breaker("pay"))
    until(lambda: b.breaker("pay").state is BreakerState.OPEN)
    time.sleep(1.05)
    probe = b.breaker("pay").admit()
    b.breaker("pay").record_failure(0.01, probe)
    probe = a.breaker("pay").admit()
    a.breaker("pay").record_failure(0.01, probe)  # 2 of 3 failed: 0.67 >= 0.5
    until(lambda: a.breaker("pay").state is BreakerState.OPEN, 1.0)
    until(lambda: b.breaker("pay").state is BreakerState.OPEN, 1.0)
    assert a.breaker("pay").snapshot().consecutive_opens == 2


def test_steady_state_makes_no_redis_command_per_call(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    breaker, budget = a.breaker("pay"), a.runtime("pay").budget
    for _ in range(100):
        succeed(breaker)
    time.sleep(0.3)
    before = sum(server.commands().values())
    start = time.monotonic()
    calls = 0
    while time.monotonic() - start < 1.0 and calls < 200_000:
        budget.record_call()
        succeed(breaker)
        calls += 1
    used = sum(server.commands().values()) - before - 2  # the two INFOs
    # The heartbeat (one script call a second per process, a few commands inside it) and
    # nothing per call.
    assert used / calls < 0.001, (used, calls)


# --- the retry budget, fleet-wide ----------------------------------------------------------


def test_the_budget_floor_is_shared_not_multiplied(fleet: Callable[..., gg.Guard]) -> None:
    retry = {"budget_ratio": 0.0, "budget_min_per_second": 5.0}
    guards = [fleet(**retry) for _ in range(4)]
    connected(*guards)
    budgets = [g.runtime("pay").budget for g in guards]
    allowed = 0
    for _ in range(8):
        for budget in budgets:
            allowed += budget.try_spend()
        time.sleep(0.11)  # counts travel every 100 ms while retrying
    # Locally each process would allow 5 in the first second: 20 in all. Shared, the
    # fleet gets about its one floor, with what one exchange interval lets through.
    # Under load the exchange thread can lag an interval: still far from 20.
    assert allowed <= 12, allowed


# --- Redis trouble -------------------------------------------------------------------------


def test_redis_down_at_start_warns_once_and_joins_when_it_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        down = RedisServer(redis_binary(), Path(directory))
        caplog.set_level(logging.WARNING, "gateway_guard")
        guard = gg.Guard(settings(down.url, "test:down"))
        try:
            breaker = guard.breaker("pay")
            start = time.monotonic()
            for _ in range(10):
                fail(breaker)  # local protection meanwhile
            assert time.monotonic() - start < 0.05
            assert breaker.state is BreakerState.OPEN
            time.sleep(0.5)
            warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(warnings) == 1
            assert "redis://127.0.0.1" in warnings[0].getMessage()
            down.start()
            try:
                connected(guard)
                until(lambda: guard._store is not None and guard._store.connected, 2.0)
            finally:
                down.stop()
        finally:
            guard.close()


def test_redis_killed_and_restarted_converges(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    server.stop()
    try:
        start = time.monotonic()
        for _ in range(10):
            fail(a.breaker("pay"))  # no wait on the dead store, local protection goes on
        assert time.monotonic() - start < 0.05
        assert a.breaker("pay").state is BreakerState.OPEN
        assert b.breaker("pay").state is BreakerState.CLOSED
    finally:
        server.start()
    # The decision made while Redis was away reaches the fleet once it is back.
    assert until(lambda: b.breaker("pay").state is BreakerState.OPEN, 3.0) < 3.0


def test_flushed_keys_are_rebuilt(fleet: Callable[..., gg.Guard], server: RedisServer) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    a.breaker("pay").force_open()
    until(lambda: b.breaker("pay").state is BreakerState.FORCED_OPEN)
    assert server.command("FLUSHALL") == "+OK"
    time.sleep(1.3)  # the safety-net poll finds the record gone and writes it back
    assert b.breaker("pay").state is BreakerState.FORCED_OPEN
    a.breaker("pay").reset()
    until(lambda: b.breaker("pay").state is BreakerState.CLOSED)


# --- the transition listener ----------------------------------------------------------------


def test_subscribe_sees_transitions_with_reasons() -> None:
    guard = gg.Guard({"upstreams": {"pay": {"breaker": BREAKER}}})
    seen: list[gg.Transition] = []
    breaker = guard.breaker("pay")
    unsubscribe = breaker.subscribe(seen.append)
    for _ in range(10):
        fail(breaker)
    breaker.force_closed()
    unsubscribe()
    breaker.force_open()
    assert [(t.old, t.new, t.reason) for t in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN, "failure_rate"),
        (BreakerState.OPEN, BreakerState.CLOSED, "force_closed"),
    ]
    assert all(t.upstream == "pay" and t.at > 0 for t in seen)


def test_a_failing_callback_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = gg.Guard({"upstreams": {"pay": {"breaker": BREAKER}}})
    breaker = guard.breaker("pay")

    def broken(transition: gg.Transition) -> None:
        raise RuntimeError("boom")

    breaker.subscribe(broken)
    with caplog.at_level(logging.ERROR, "gateway_guard"):
        breaker.force_open()
        breaker.force_closed()
        breaker.force_open()
    assert len([r for r in caplog.records if "transition subscriber" in r.getMessage()]) == 1
    assert breaker.state is BreakerState.FORCED_OPEN


# --- fork safety -----------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_gets_its_own_store(fleet: Callable[..., gg.Guard]) -> None:
    """gunicorn --preload: the Guard (and its store) exist before the workers fork."""
    parent, other = fleet(), fleet()
    connected(parent, other)
    assert parent._store is not None
    parent_id = parent._store._me
    pid = os.fork()
    if pid == 0:  # the child: new connections, threads and identity, then act for the fleet
        code = 1
        try:
            store = parent._store
            deadline = time.monotonic() + 5.0
            while not store.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            if store.connected and store._me != parent_id:
                parent.breaker("pay").force_open()
                time.sleep(0.3)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    until(lambda: other.breaker("pay").state is BreakerState.FORCED_OPEN, 1.0)
    until(lambda: parent.breaker("pay").state is BreakerState.FORCED_OPEN, 1.0)


def test_reset_reaches_processes_that_disagree(fleet: Callable[..., gg.Guard]) -> None:
    """An operator's reset applies fleet-wide even where the caller was already closed."""
    a, b = fleet(), fleet()
    connected(a, b)
    a.breaker("pay").force_open()
    until(lambda: b.breaker("pay").state is BreakerState.FORCED_OPEN)
    # Meanwhile only b hears of a local change (as if a's message were lost)...
    b.breaker("pay").adopt(BreakerState.CLOSED)
    a.breaker("pay").adopt(BreakerState.CLOSED)
    a.breaker("pay").force_open()
    until(lambda: b.breaker("pay").state is BreakerState.FORCED_OPEN)
    b.breaker("pay").adopt(BreakerState.CLOSED)  # b closed locally, a still forced open
    b.breaker("pay").reset()  # no change in b: still reaches a
    until(lambda: a.breaker("pay").state is BreakerState.CLOSED, 1.0)


def test_an_operators_action_is_not_undone_by_a_record_read_before_it() -> None:
    """The race the fleet e2e test caught under load: the sync thread read the record, an
    operator forced the breaker open here, then the sync adopted what it had read (closed)
    over it, and the force-open was published as "closed". A record is not adopted over an
    action this process has not published yet."""
    guard = gg.Guard(settings("redis://127.0.0.1:9/0", "test:race"))  # never connects
    try:
        store = guard._store
        assert store is not None
        member = store._members["pay"]
        breaker = guard.breaker("pay")
        read_before = {"state": "closed", "gen": "7", "epoch": "e1", "opens": "0"}
        breaker.force_open()
        with store._lock:
            store._adopt(member, read_before, int(time.time() * 1000))
        assert breaker.state is BreakerState.FORCED_OPEN
        assert (member.epoch, member.gen) == ("", 0)  # not taken as seen: read again later
        member.manual_seen = breaker.manual_seq  # as _publish does once it is published
        with store._lock:
            store._adopt(member, read_before, int(time.time() * 1000))
        assert breaker.state is BreakerState.CLOSED  # a later decision elsewhere: adopted
        assert (member.epoch, member.gen) == ("e1", 7)
    finally:
        guard.close()


def test_adopt_refuses_a_state_over_an_operators_later_action() -> None:
    breaker = gg.CircuitBreaker("pay", BreakerPolicy(), clock=FakeClock())
    seen = breaker.manual_seq
    assert breaker.adopt(BreakerState.FORCED_OPEN, manual_seq=seen)
    breaker.reset()
    assert not breaker.adopt(BreakerState.FORCED_OPEN, manual_seq=seen)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.adopt(BreakerState.FORCED_OPEN)  # no sequence given: as before
    assert breaker.adopt(BreakerState.CLOSED, manual_seq=breaker.manual_seq)
    assert breaker.state is BreakerState.CLOSED


def test_a_slow_redis_never_delays_a_call(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    a.breaker("pay").force_closed()
    for _ in range(10):
        fail(a.breaker("pay"))
    until(lambda: b.breaker("pay").state is BreakerState.OPEN)
    time.sleep(1.05)  # open_seconds: the next call is a probe, which asks Redis for a token
    assert server.command("CLIENT", "PAUSE", "1500", "ALL") == "+OK"
    try:
        start = time.monotonic()
        probe = b.breaker("pay").admit()  # no answer within 50 ms: decided locally
        took = time.monotonic() - start
        b.breaker("pay").record_success(0.01, probe)
    finally:
        server.command("CLIENT", "UNPAUSE")
    assert probe
    assert took < 0.2, took


# --- the breaker's fleet hooks, without Redis ---------------------------------------------------


def test_peer_counts_dilute_and_complete_the_window() -> None:

    clock = FakeClock()
    policy = BreakerPolicy(min_calls=10, window_size=20, failure_rate=0.5, half_open_calls=3)
    breaker = gg.CircuitBreaker("pay", policy, clock=clock)
    breaker.set_peer_counts(60, 0, 0)  # healthy peers
    for _ in range(20):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED  # 20 of 80 failed
    breaker.set_peer_counts(20, 20, 0)  # the peers start failing too: 40 of 40
    assert breaker.state is BreakerState.OPEN
    breaker.force_closed()
    assert breaker._peer_calls == 0  # a fresh window forgets the peers' old counts too
    other = gg.CircuitBreaker("pay", policy, clock=clock)
    for _ in range(4):
        fail(other)
    assert other.state is BreakerState.CLOSED  # 4 calls: under min_calls alone
    other.set_peer_counts(6, 6, 0)  # ...but 10 fleet-wide
    assert other.state is BreakerState.OPEN


def test_fleet_probe_totals_decide_and_adopt_follows() -> None:

    clock = FakeClock()
    policy = BreakerPolicy(min_calls=2, window_size=2, half_open_calls=3, open_seconds=1.0)
    breaker = gg.CircuitBreaker("pay", policy, clock=clock)
    breaker.adopt(BreakerState.OPEN, 1.0, 1)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1.0)
    probe = breaker.admit()
    assert probe
    breaker.record_success(0.01, probe)  # one of three probes: undecided here
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.set_fleet_probes(3, 0, 0)  # the fleet's three passed
    assert breaker.state is BreakerState.CLOSED
    breaker.adopt(BreakerState.FORCED_OPEN)
    assert breaker.state is BreakerState.FORCED_OPEN
    breaker.adopt(BreakerState.HALF_OPEN, 0.0, 2)  # the fleet is probing: so may we
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.snapshot().consecutive_opens == 2


def test_a_bad_redis_url_is_shown_without_its_password() -> None:
    with pytest.raises(SettingsError, match=r"state\.redis_url") as info:
        gg.Guard({"state": {"redis_url": "redis://app:s3cret@host:99999/0"}})
    assert "s3cret" not in str(info.value)
    assert "app:***@host" in str(info.value)
