"""The status page's fleet view (#14) against a real redis-server.

Each ``Guard`` has its own fleet store, identity and connections, as a worker process
would; they share one Redis. The status JSON is read over HTTP from a real WSGI server
(cheroot) where the adapter matters, and through ``status_data`` where only the data
does. Gateway errors are recorded through the real error path (``log_gateway_error``).
tests/test_e2e_status_fleet.py runs real gunicorn workers.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard import _fleet
from gateway_guard._status import find_error, status_data
from gateway_guard.errors import UpstreamConnectError
from gateway_guard.inbound._errors import log_gateway_error
from gateway_guard.inbound._start import start
from redis_server import RedisServer, redis_server
from servers import serve_asgi, serve_wsgi

STATUS = "/_gateway_guard"
JSON = {"Accept": "application/json"}
BREAKER = {"min_calls": 50, "window_size": 100, "failure_rate": 0.5, "consecutive_timeouts": 0}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def settings(url: str, prefix: str, state: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "service": "shop",
        "state": {"backend": "redis", "redis_url": url, "key_prefix": prefix, **(state or {})},
        "upstreams": {
            "pay": {"base_url": "http://127.0.0.1:9", "breaker": BREAKER},
            "ship": {"base_url": "http://127.0.0.1:9", "breaker": BREAKER},
        },
        "status": {"path": STATUS},
        **extra,
    }


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"test:{request.node.name}:{time.monotonic_ns()}"


@pytest.fixture
def fleet(server: RedisServer, prefix: str) -> Iterator[Callable[..., gg.Guard]]:
    """Make Guards (one per simulated process) on a prefix of this test's own."""
    guards: list[gg.Guard] = []

    def make(**extra: Any) -> gg.Guard:
        guard = gg.Guard(settings(server.url, prefix, **extra))
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        guard.close()


def until(condition: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.01)


def connected(*guards: gg.Guard) -> None:
    until(lambda: all(g._store is not None and g._store.connected for g in guards))


def every_process_seen(guard: gg.Guard, count: int) -> dict[str, Any]:
    """The status data once ``count`` processes are listed (heartbeats are 1 s apart)."""
    return until(
        lambda: (
            (d := status_data(guard))["fleet"]["available"]
            and len(d["fleet"]["processes"]) == count
            and d
        ),
        3.0,
    )


def gateway_error(guard: gg.Guard, reference: str, upstream: str = "pay") -> None:
    """A gateway error answered for ``reference``, through the real error path."""
    ctx = start(guard, "GET", "/orders/1", reference, None)
    error = UpstreamConnectError(upstream=upstream, proxy_error="connection_refused", attempts=1)
    log_gateway_error(ctx, error)


def fail(breaker: gg.CircuitBreaker) -> None:
    breaker.record_failure(0.01, breaker.admit())


def succeed(breaker: gg.CircuitBreaker) -> None:
    breaker.record_success(0.01, breaker.admit())


# --- the processes and their numbers -------------------------------------------------------


def test_the_fleet_lists_every_live_process_and_adds_up_their_windows(
    fleet: Callable[..., gg.Guard],
) -> None:
    a, b, c = fleet(), fleet(), fleet()
    connected(a, b, c)
    for _ in range(6):
        succeed(a.breaker("pay"))
    for _ in range(3):
        fail(b.breaker("pay"))
    for _ in range(4):
        succeed(c.breaker("pay"))
    fail(c.breaker("pay"))
    held = c.runtime("pay").bulkhead.try_acquire()  # one call in flight in c
    assert held
    try:
        every_process_seen(a, 3)

        def carried() -> dict[str, Any] | None:
            # Once every process's heartbeat (1 s apart, later on a busy machine) has
            # carried these numbers.
            data = status_data(a)
            windows = [p["upstreams"].get("pay", {}) for p in data["fleet"]["processes"]]
            calls = sorted(w.get("calls", 0) for w in windows)
            in_flight = sorted(w.get("in_flight", 0) for w in windows)
            return data if (calls, in_flight) == ([3, 5, 6], [0, 0, 1]) else None

        data = until(carried, 5.0)
    finally:
        c.runtime("pay").bulkhead.release()
    processes = data["fleet"]["processes"]
    ids = {g._store._me.rsplit(":", 1)[1] for g in (a, b, c) if g._store is not None}
    assert {p["id"] for p in processes} == ids
    assert [p["this_process"] for p in processes].count(True) == 1
    assert all(p["pid"] == os.getpid() for p in processes)
    assert all(0 <= p["last_seen"] < 2.5 for p in processes)
    by_id = {p["id"]: p["upstreams"] for p in processes}
    assert sorted(u["pay"]["calls"] for u in by_id.values()) == [3, 5, 6]
    assert sorted(u["pay"]["in_flight"] for u in by_id.values()) == [0, 0, 1]
    pay = data["upstreams"]["pay"]
    # This process's own numbers, with the fleet's beside them.
    assert (pay["calls"], pay["failures"]) == (6, 0)
    assert pay["fleet"] == {
        "calls": 14,
        "failures": 4,
        "slow_calls": 0,
        "failure_rate": round(4 / 14, 4),
        "slow_call_rate": 0.0,
        "processes": 3,
        "in_flight": 1,
    }
    assert data["upstreams"]["ship"]["fleet"]["calls"] == 0
    assert data["process"]["pid"] == os.getpid()
    assert data["note"] is None
    assert data["fleet"]["read_ago"] <= 1.5


def test_this_processs_row_is_its_own_window_whatever_order_redis_keeps(
    fleet: Callable[..., gg.Guard],
) -> None:
    # Peers that reported before this process come first in Redis's hash: this process's
    # row must still hold its own counts, not the running fleet totals.
    b, c = fleet(), fleet()
    connected(b, c)
    for _ in range(3):
        fail(b.breaker("pay"))
    for _ in range(5):
        succeed(c.breaker("pay"))
    every_process_seen(b, 2)
    a = fleet()
    connected(a)
    for _ in range(2):
        succeed(a.breaker("pay"))

    def carried() -> dict[str, Any] | None:
        data = status_data(a)
        fleet_pay = data["upstreams"]["pay"].get("fleet") or {}
        return data if fleet_pay.get("calls") == 10 and fleet_pay.get("processes") == 3 else None

    data = until(carried, 5.0)
    mine = next(p for p in data["fleet"]["processes"] if p["this_process"])
    assert mine["upstreams"]["pay"]["calls"] == 2
    assert mine["upstreams"]["pay"]["failures"] == 0
    rows = sorted(p["upstreams"]["pay"]["calls"] for p in data["fleet"]["processes"])
    assert rows == [2, 3, 5]


def test_hosts_are_named_only_with_debug(fleet: Callable[..., gg.Guard]) -> None:
    quiet, loud = fleet(), fleet(debug=True)
    connected(quiet, loud)
    host = socket.gethostname()
    hidden = every_process_seen(quiet, 2)
    shown = every_process_seen(loud, 2)
    assert "host" not in hidden["process"]
    assert all("host" not in p for p in hidden["fleet"]["processes"])
    assert host not in json.dumps(hidden)
    assert shown["process"]["host"] == host
    assert {p["host"] for p in shown["fleet"]["processes"]} == {host}


def test_a_process_that_stops_drops_out(fleet: Callable[..., gg.Guard]) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    every_process_seen(a, 2)
    b.close()
    # Silent for PEER_TTL_MS (5 s): gone from the list, and from the totals.
    data = until(lambda: len((d := status_data(a))["fleet"]["processes"]) == 1 and d, 7.0)
    assert data["fleet"]["processes"][0]["this_process"]
    assert data["upstreams"]["pay"]["fleet"]["processes"] == 1


def test_the_fleet_view_costs_no_redis_command(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    every_process_seen(a, 2)
    store = a._store
    assert store is not None
    before = server.commands()
    for _ in range(50):
        store.status(debug=False)
    after = server.commands()
    # Only the background heartbeats (scripts) ran meanwhile, and the two INFOs.
    assert {name for name in after if after[name] != before.get(name)} <= {"evalsha", "info"}


# --- recent errors, fleet-wide -------------------------------------------------------------


def test_a_reference_recorded_in_one_process_is_found_in_every_other(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b, c = fleet(), fleet(), fleet()
    connected(a, b, c)
    gateway_error(a, "ref-from-a")
    gateway_error(b, "ref-from-b", upstream="ship")
    for guard in (a, b, c):
        for ref in ("ref-from-a", "ref-from-b"):
            # Shared by each process's thread within a TICK (100 ms).
            until(lambda guard=guard, ref=ref: find_error(guard, ref)[0], 1.0)
    record, note = find_error(c, "ref-from-b")
    assert note is None and record is not None
    assert (record["reference"], record["upstream"], record["status"]) == (
        "ref-from-b",
        "ship",
        502,
    )
    assert record["proxy_error"] == "connection_refused"
    # The shared record holds exactly what the local ring does: nothing more.
    local = b.recent_errors.find("ref-from-b") if b.recent_errors is not None else None
    assert local is not None and record == local.as_json()
    # This process's ring is asked first: a local hit makes no Redis command.
    before = server.commands().get("hget", 0)
    assert find_error(a, "ref-from-a")[0] is not None
    assert server.commands().get("hget", 0) == before
    assert find_error(c, "ref-from-a")[0] is not None
    assert server.commands().get("hget", 0) == before + 1
    assert find_error(c, "never-answered") == (None, None)


def test_the_list_of_recent_errors_is_the_fleets_newest(fleet: Callable[..., gg.Guard]) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    gateway_error(b, "older-in-b")
    time.sleep(1.05)  # a later second: the list is ordered by the records' time
    gateway_error(a, "newer-in-a")
    # At once (before a's record was shared), a shows it with b's.
    first = status_data(a)
    assert first["recent_errors_scope"] == "fleet"
    assert [e["reference"] for e in first["recent_errors"]] == ["newer-in-a", "older-in-b"]
    data = until(lambda: len((d := status_data(b))["recent_errors"]) == 2 and d, 1.0)
    assert [e["reference"] for e in data["recent_errors"]] == ["newer-in-a", "older-in-b"]
    assert len(status_data(a, errors=1)["recent_errors"]) == 1


def test_the_fleets_errors_are_bounded_in_redis(
    fleet: Callable[..., gg.Guard], server: RedisServer, prefix: str
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    gateway_error(a, "the-first")
    for i in range(_fleet.ERRORS_KEPT + 40):
        gateway_error(b, f"ref-{i}")
    gateway_error(a, "ref-7")  # a reference seen again: the newer record wins
    until(lambda: find_error(a, f"ref-{_fleet.ERRORS_KEPT + 39}")[0], 2.0)
    # a's record of ref-7 leaves with a's own next share, which may come after b's last.
    until(lambda: find_error(b, "ref-7")[0], 2.0)
    until(lambda: server.command("ZCARD", f"{prefix}:errors") == f":{_fleet.ERRORS_KEPT}", 2.0)
    assert server.command("HLEN", f"{prefix}:errors:index") == f":{_fleet.ERRORS_KEPT}"
    ttl = int(server.command("TTL", f"{prefix}:errors:index")[1:])
    assert 0 < ttl <= _fleet.ERRORS_TTL
    # Pushed out of the fleet's list, still in its own process's ring.
    assert find_error(b, "the-first") == (None, None)
    assert find_error(a, "the-first")[0] is not None
    assert find_error(b, "ref-0") == (None, None)
    assert find_error(b, "ref-7")[0] is not None
    assert b._store is not None
    shared = b._store.fleet_errors(1000)
    assert shared is not None and len(shared) == _fleet.ERRORS_KEPT
    assert [e["reference"] for e in shared[:2]] == ["ref-7", f"ref-{_fleet.ERRORS_KEPT + 39}"]


def test_recording_an_error_never_waits_for_redis(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a = fleet()
    connected(a)
    assert server.command("CLIENT", "PAUSE", "600", "ALL") == "+OK"
    try:
        start_at = time.perf_counter()
        for i in range(200):
            gateway_error(a, f"while-paused-{i}")
        took = time.perf_counter() - start_at
    finally:
        server.command("CLIENT", "UNPAUSE")
    assert took < 0.1, took  # 200 errors, each an append: no Redis wait in any
    until(lambda: find_error(a, "while-paused-199")[1] is None and a._store.connected, 3.0)


# --- Redis away or slow --------------------------------------------------------------------


def test_redis_down_the_page_answers_with_local_data_and_says_so(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    every_process_seen(a, 2)
    gateway_error(b, "shared-before")
    until(lambda: find_error(a, "shared-before")[0], 1.0)
    with serve_wsgi(gg.GatewayGuardWSGI(lambda env, sr: [], guard=a)) as url:
        server.stop()
        try:
            gateway_error(a, "while-down")
            until(lambda: a._store is not None and not a._store.connected, 2.0)
            started = time.perf_counter()
            page = httpx.get(f"{url}{STATUS}", headers=JSON, timeout=5.0)
            took = time.perf_counter() - started
            missing = httpx.get(f"{url}{STATUS}/errors/shared-before", headers=JSON)
            local = httpx.get(f"{url}{STATUS}/errors/while-down", headers=JSON)
        finally:
            server.start()
    assert page.status_code == 200
    assert took < 0.2, took  # no wait on the dead store
    data = page.json()
    assert data["fleet"]["available"] is False
    assert data["fleet"]["note"].startswith("fleet data unavailable")
    assert data["fleet"]["processes"] == []
    assert data["note"].endswith(f"this process's (pid {os.getpid()}) only")
    assert data["upstreams"]["pay"]["fleet"] is None
    assert data["upstreams"]["pay"]["state"] == "closed"  # this process's numbers still
    assert data["recent_errors_scope"] == "process"
    assert [e["reference"] for e in data["recent_errors"]] == ["while-down"]
    assert missing.status_code == 404
    assert "fleet data unavailable" in missing.json()["note"]
    assert local.status_code == 200 and local.json()["reference"] == "while-down"
    # Redis back: the error recorded meanwhile is shared, and the page is the fleet's again.
    connected(a, b)
    until(lambda: find_error(b, "while-down")[0], 3.0)
    assert status_data(a)["recent_errors_scope"] == "fleet"


def test_errors_queued_while_redis_is_down_are_bounded_and_shared_on_return(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a, b = fleet(), fleet()
    connected(a, b)
    server.stop()
    try:
        until(lambda: a._store is not None and not a._store.connected, 2.0)
        for i in range(_fleet.ERRORS_QUEUED + 100):
            gateway_error(a, f"queued-{i}")
    finally:
        server.start()
    connected(a, b)
    newest = f"queued-{_fleet.ERRORS_QUEUED + 99}"
    until(lambda: find_error(b, newest)[0], 3.0)
    # The oldest went first, and the page counts them.
    assert find_error(b, "queued-0") == (None, None)
    assert find_error(b, "queued-100")[0] is not None
    assert status_data(a)["fleet"]["errors_not_shared"] == 100


def test_a_slow_redis_delays_the_page_once_by_command_timeout_at_most(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    a = fleet(state={"command_timeout": 0.1})
    connected(a)
    assert server.command("CLIENT", "PAUSE", "1500", "ALL") == "+OK"
    try:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            data = status_data(a)
            timings.append(time.perf_counter() - started)
    finally:
        server.command("CLIENT", "UNPAUSE")
    assert data["recent_errors_scope"] == "process"
    assert timings[0] < 0.1 + 0.1, timings  # the read, bounded by command_timeout
    # After a failed read the page does not ask again for a while.
    assert max(timings[1:]) < 0.02, timings


def test_a_slow_redis_never_holds_the_event_loop(
    fleet: Callable[..., gg.Guard], server: RedisServer
) -> None:
    """Under an ASGI server the page's Redis read waits on a worker thread: while it
    waits, the app's other requests on the same event loop are answered."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    a = fleet(state={"command_timeout": 0.6})
    connected(a)

    async def ping(request: Any) -> PlainTextResponse:
        return PlainTextResponse("pong")

    app = Starlette(routes=[Route("/ping", ping)])
    app.add_middleware(gg.GatewayGuardMiddleware, guard=a)
    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=5) as client:
        assert client.get("/ping").text == "pong"
        page: dict[str, Any] = {}

        def load_page() -> None:
            started = time.perf_counter()
            with httpx.Client(base_url=base, timeout=5) as own:
                page["data"] = own.get(STATUS, headers=JSON).json()
            page["seconds"] = time.perf_counter() - started

        assert server.command("CLIENT", "PAUSE", "2000", "ALL") == "+OK"
        try:
            loader = threading.Thread(target=load_page)
            loader.start()
            time.sleep(0.15)  # the page's read is waiting on the paused Redis by now
            pings = []
            for _ in range(3):
                started = time.perf_counter()
                assert client.get("/ping").text == "pong"
                pings.append(time.perf_counter() - started)
            waited_while_page_loaded = loader.is_alive()
            loader.join(5)
        finally:
            server.command("CLIENT", "UNPAUSE")
    # The page did wait on Redis (bounded by command_timeout), and answered with local data.
    assert page["seconds"] > 0.5, page
    assert page["data"]["recent_errors_scope"] == "process"
    # Meanwhile the loop served every ping at once, not after the page's read.
    assert waited_while_page_loaded
    assert max(pings) < 0.2, pings


# --- the local backend, and the HTML -------------------------------------------------------


def test_the_local_backend_says_whose_numbers_these_are(upstream: Any) -> None:
    guard = gg.Guard({"upstreams": {"pay": {"base_url": upstream.url}}, "status": {"path": STATUS}})
    gateway_error(guard, "here-only")
    with serve_wsgi(gg.GatewayGuardWSGI(lambda env, sr: [], guard=guard)) as url:
        data = httpx.get(f"{url}{STATUS}", headers=JSON).json()
        missing = httpx.get(f"{url}{STATUS}/errors/elsewhere", headers=JSON)
    pid = os.getpid()
    assert data["backend"] == "local"
    assert data["process"] == {"pid": pid}
    assert f"this process's (pid {pid}) only" in data["note"]
    assert data["fleet"] is None
    assert data["recent_errors_scope"] == "process"
    assert "fleet" not in data["upstreams"]["pay"]
    assert missing.status_code == 404
    assert f"searched this process (pid {pid}) only" in missing.json()["note"]


def test_the_page_has_a_fleet_section_rendered_from_the_json() -> None:
    guard = gg.Guard({"status": {"path": STATUS}})
    with serve_wsgi(gg.GatewayGuardWSGI(lambda env, sr: [], guard=guard)) as url:
        page = httpx.get(f"{url}{STATUS}", headers={"Accept": "text/html"}).text
    for needed in ('id="fleet-h"', 'id="fleet-upstreams"', 'id="processes"', 'id="scope"'):
        assert needed in page
    assert "data.fleet" in page and "recent_errors_scope" in page
