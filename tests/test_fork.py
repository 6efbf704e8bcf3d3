"""Fork safety (issue #15, defect 8): a child forked while threads use the guard works.

``os.fork()`` copies only the forking thread: locks and slots the others held stay
held in the child unless the guard re-makes them. Real processes: threads hammer one
Guard (inbound shedding, bulkhead, breaker, retry budget) while the main thread forks
repeatedly, and every child must finish a guarded call and an admission in time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time

import httpx
import pytest

import gateway_guard as gg

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

FORKS = 30
CHILD_TIMEOUT = 10.0


def _answer(counter: itertools.count[int]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        # Every third call fails, so breaker windows, retries and the budget all work.
        return httpx.Response(503 if next(counter) % 3 == 0 else 200)

    return httpx.MockTransport(handler)


def _guarded_work(guard: gg.Guard, client: httpx.Client) -> None:
    guard.shedding.admit(None, "normal")
    try:
        client.get("/x")
    except gg.UpstreamError:
        pass  # shed, breaker open or a 503 after retries: all answers, none a hang
    finally:
        guard.shedding.release(None)


def _wait(pid: int) -> int | None:
    """The child's exit code, or None when it hung (it is then killed)."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_children_forked_while_threads_use_the_guard_can_use_it() -> None:
    guard = gg.Guard(
        {
            "service": "shop",
            "upstreams": {
                "up": {
                    "base_url": "http://up.test",
                    "bulkhead": {"max_concurrent": 2, "max_wait": 0.2},
                    "retry": {"backoff_initial": 0.0005, "backoff_max": 0.001},
                    "breaker": {"min_calls": 5, "window_size": 10, "open_seconds": 0.05},
                }
            },
            "shed": {"max_concurrent": 2, "max_queue": 16, "queue_timeout": 0.5},
        }
    )
    transport = _answer(itertools.count())
    stop = threading.Event()

    def hammer() -> None:
        with guard.client("up", transport=transport) as client:
            while not stop.is_set():
                with contextlib.suppress(gg.LoadShedError):
                    _guarded_work(guard, client)

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    outcomes: list[int | None] = []
    try:
        for _ in range(FORKS):
            time.sleep(0.003)
            pid = os.fork()
            if pid == 0:  # the child: exits without running anything of pytest's
                # 2: shed, because slots the parent's threads held were never given
                # back; 1: anything else; a hang is caught by _wait.
                code = 1
                try:
                    with guard.client("up", transport=transport) as client:
                        for _ in range(3):
                            _guarded_work(guard, client)
                    code = 0
                except gg.LoadShedError:
                    code = 2
                finally:
                    os._exit(code)
            outcomes.append(_wait(pid))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    assert outcomes == [0] * FORKS, f"hung: {outcomes.count(None)}, failed: {outcomes}"


def _hold(lock: threading.Lock, held: threading.Event, release: threading.Event) -> None:
    with lock:
        held.set()
        release.wait(CHILD_TIMEOUT)


@pytest.mark.implementation
def test_a_lock_held_by_another_thread_at_fork_time_is_free_in_the_child() -> None:
    # The race the stress test above only hits by chance, made certain: another thread
    # holds each lock while the main thread forks.
    from gateway_guard.inbound import _errors

    guard = gg.Guard(
        {
            "upstreams": {"up": {"bulkhead": {"max_concurrent": 2, "max_wait": 0.1}}},
            "shed": {"max_concurrent": 2},
        }
    )
    runtime = guard.runtime("up")
    checks = {
        "shedding": (guard.shedding.app, guard.shedding.app.snapshot),
        "bulkhead": (runtime.bulkhead, runtime.bulkhead.snapshot),
        "breaker": (runtime.breaker, runtime.breaker.snapshot),
        "budget": (runtime.budget, runtime.budget.try_spend),
        "log throttle": (_errors._throttle, lambda: _errors._throttle.admit(("up", None), 0.0)),
    }
    for name, (owner, use) in checks.items():
        lock = owner._lock  # type: ignore[attr-defined]
        held, release = threading.Event(), threading.Event()
        thread = threading.Thread(target=_hold, args=(lock, held, release))
        thread.start()
        held.wait(CHILD_TIMEOUT)
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    use()
                    code = 0
                finally:
                    os._exit(code)
            assert _wait(pid) == 0, name
        finally:
            release.set()
            thread.join()
