"""What the status page shows: the guard's live numbers as plain JSON data.

Everything is read through the public snapshots (``CircuitBreaker.snapshot()``,
``Limiter.snapshot()``, ``RetryBudget.counts()``), so a breaker whose state lives
elsewhere (a shared backend) shows here as its snapshot says. Upstream hostnames and
URLs appear only with ``debug = true``.

Which numbers are whose is said in the data itself: ``process`` is the process that
answered. With the local backend every number is its own (``note`` says so: behind
several workers each answer comes from whichever worker took the connection). With the
Redis backend the fleet store adds ``fleet`` (the live processes and their counts) and each
upstream's fleet totals, from what its background thread read last (no Redis command),
and the recent errors are the fleet's (one read bounded by ``command_timeout``); when
Redis cannot answer, the page says so and shows this process's numbers.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["BUDGET_WINDOW", "find_error", "status_data"]

# The retry budget's sliding window, in seconds (RetryBudget.from_policy's default).
BUDGET_WINDOW = 10.0


def _rate(value: float) -> float:
    return round(value, 4)


def _upstream(guard: Guard, name: str) -> dict[str, Any]:
    rt = guard.runtime(name)
    breaker = rt.breaker.snapshot()
    calls, retries = rt.budget.counts()
    retry = rt.policy.retry
    # The budget's window formula (RetryBudget) over a full window: what may still be
    # spent on retries now; the per-second rate bound may allow fewer in a burst.
    allowance = retry.budget_ratio * calls + retry.budget_min_per_second * BUDGET_WINDOW
    bulkhead = rt.bulkhead.snapshot()
    data: dict[str, Any] = {
        "state": breaker.state.value,
        "failure_rate": _rate(breaker.failure_rate),
        "slow_call_rate": _rate(breaker.slow_rate),
        "calls": breaker.calls,
        "failures": breaker.failures,
        "slow_calls": breaker.slow,
        "half_open_in": (
            None if breaker.open_remaining is None else round(breaker.open_remaining, 3)
        ),
        "consecutive_opens": breaker.consecutive_opens,
        "retry_budget": {
            "calls": calls,
            "retries": retries,
            "left": max(0, int(allowance - retries)),
        },
        "bulkhead": {
            "in_flight": bulkhead.in_flight,
            "limit": bulkhead.max_concurrent or None,
            "queued": bulkhead.queued,
            "rejected": bulkhead.rejected,
        },
    }
    if guard.settings.debug:
        data["base_url"] = rt.policy.base_url
    return data


def _routes(guard: Guard) -> dict[str, Any]:
    shedding = guard.shedding
    names = {route.index: route.name for route in guard.policies.routes.routes}
    limiters = {"*": shedding.app}
    for key, limiter in shedding.routes.items():
        limiters[names.get(key, str(key)) if isinstance(key, int) else key] = limiter
    out: dict[str, Any] = {}
    for name, limiter in limiters.items():
        snap = limiter.snapshot()
        out[name] = {
            "in_flight": snap.in_flight,
            "queued": snap.queued,
            "limit": snap.max_concurrent or None,
            "queue_limit": snap.max_queue,
            "shed": snap.rejected + snap.evicted + snap.timed_out,
        }
    return out


def _only_here(pid: int) -> str:
    return f"every number on this page is this process's (pid {pid}) only"


def _newest(shared: list[dict[str, Any]], local: list[dict[str, Any]], count: int) -> list[Any]:
    # The fleet's list, with this process's records it has not shared yet (at most a
    # TICK old), newest first; a record in both is shown once.
    seen: set[str] = set()
    out = []
    # Stable, also reversed: records of the same second keep the fleet's order.
    for record in sorted(shared + local, key=lambda r: str(r.get("time")), reverse=True):
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out[:count]


def status_data(guard: Guard, *, errors: int = 20) -> dict[str, Any]:
    """The status page's JSON: service, the answering process, upstreams, routes (``"*"``
    is the whole app), the fleet (Redis backend) and the newest ``errors`` gateway
    errors."""
    settings = guard.settings
    recent = guard.recent_errors
    store = guard._store
    local = [record.as_json() for record in recent.latest(errors)] if recent is not None else []
    upstreams = {name: _upstream(guard, name) for name in guard.upstreams}
    data: dict[str, Any] = {
        "service": settings.service,
        "backend": settings.state.backend,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if store is None:
        pid = os.getpid()
        data["process"] = {"pid": pid}
        data["note"] = (
            f"local backend: {_only_here(pid)}; each worker process has its own breakers, "
            "counts and recent errors"
        )
        fleet = None
        listed, scope = local, "process"
    else:
        view = store.status(debug=settings.debug)
        data["process"] = view["process"]
        fleet = view["fleet"]
        pid = data["process"]["pid"]
        data["note"] = None if fleet["available"] else f"{fleet['note']}; {_only_here(pid)}"
        for name, totals in view["upstreams"].items():
            if name in upstreams:
                upstreams[name]["fleet"] = totals
        shared = store.fleet_errors(errors)
        if shared is None:
            listed, scope = local, "process"
        else:
            listed, scope = _newest(shared, local, errors), "fleet"
    data["upstreams"] = upstreams
    data["routes"] = _routes(guard)
    data["fleet"] = fleet
    data["recent_errors"] = listed
    data["recent_errors_scope"] = scope
    return data


def find_error(guard: Guard, reference: str) -> tuple[dict[str, Any] | None, str | None]:
    """The record of the gateway error answered with ``reference`` (this process's ring
    first, then the fleet's), and a note when not every process's errors were searched."""
    recent = guard.recent_errors
    record = recent.find(reference) if recent is not None else None
    if record is not None:
        return record.as_json(), None
    store = guard._store
    pid = os.getpid()
    if store is None:
        return None, (
            f"searched this process (pid {pid}) only: with the local backend each worker "
            "remembers its own errors; ask the one that answered, or search the logs"
        )
    found, asked = store.find_error(reference)
    if found is None and not asked:
        return None, f"searched this process (pid {pid}) only: fleet data unavailable"
    return found, None
