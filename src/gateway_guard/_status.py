"""What the status page shows: the guard's live numbers as plain JSON data.

Everything is read through the public snapshots (``CircuitBreaker.snapshot()``,
``Limiter.snapshot()``, ``RetryBudget.counts()``), so a breaker whose state lives
elsewhere (a shared backend) shows here as its snapshot says. Upstream hostnames and
URLs appear only with ``debug = true``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["BUDGET_WINDOW", "status_data"]

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


def status_data(guard: Guard, *, errors: int = 20) -> dict[str, Any]:
    """The status page's JSON: service, upstreams, routes (``"*"`` is the whole app) and
    the newest ``errors`` gateway errors."""
    settings = guard.settings
    recent = guard.recent_errors
    return {
        "service": settings.service,
        "backend": settings.state.backend,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "upstreams": {name: _upstream(guard, name) for name in guard.upstreams},
        "routes": _routes(guard),
        "recent_errors": (
            [record.as_json() for record in recent.latest(errors)] if recent is not None else []
        ),
    }
