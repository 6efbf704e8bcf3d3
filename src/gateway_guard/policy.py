"""Frozen runtime policies, compiled once from validated settings.

The hot path only reads these: every field is already in the form it is used in
(frozensets for membership, floats in seconds, precomputed flags). Layering is
``defaults`` < ``upstreams.<name>`` < the matching ``routes`` entry, merged per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "BreakerPolicy",
    "BulkheadPolicy",
    "CallPolicy",
    "Priority",
    "RetryPolicy",
    "ShedPolicy",
]

Priority = Literal["critical", "normal", "sheddable"]
WindowKind = Literal["count", "time"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    jitter: bool = True
    on_status: frozenset[int] = frozenset({502, 503, 504})
    methods: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
    retry_non_idempotent: bool = False
    budget_ratio: float = 0.2
    budget_min_per_second: float = 10.0
    respect_retry_after: bool = True
    max_retry_after: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.attempts > 1


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    enabled: bool = True
    failure_rate: float = 0.5
    window: WindowKind = "count"
    window_size: int = 20
    min_calls: int = 10
    open_seconds: float = 30.0
    # Each re-open from half-open doubles the open time, up to this cap (then jittered).
    max_open_seconds: float = 300.0
    half_open_calls: int = 3
    slow_call_seconds: float = 5.0
    slow_call_rate: float = 1.0
    failure_status: frozenset[int] = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class BulkheadPolicy:
    max_concurrent: int = 100
    max_wait: float = 0.0


@dataclass(frozen=True, slots=True)
class ShedPolicy:
    """Inbound concurrency limit. ``max_concurrent == 0`` means no limit."""

    max_concurrent: int = 200
    max_queue: int = 400
    queue_timeout: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.max_concurrent > 0


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Everything one outbound call to ``upstream`` needs, for one route (or no route)."""

    upstream: str
    base_url: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    deadline: float = 15.0
    raise_on_failure_status: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    bulkhead: BulkheadPolicy = field(default_factory=BulkheadPolicy)
