"""Frozen runtime policies, compiled once from validated settings.

The hot path only reads these: every field is already in the form it is used in
(frozensets for membership, floats in seconds, precomputed flags). Layering is
``defaults`` < ``upstreams.<name>`` < the matching ``routes`` entry, merged per key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .errors import SettingsError, SettingsProblem
from .routing import Route, RouteTable
from .settings import (
    CallSettings,
    RouteSettings,
    Settings,
    ShedSettings,
    effective_call,
    merge_shed,
)

__all__ = [
    "BreakerPolicy",
    "BulkheadPolicy",
    "CallPolicy",
    "Policies",
    "Priority",
    "RetryPolicy",
    "ShedPolicy",
    "compile_policies",
    "compile_route",
    "compile_view_policy",
]

Priority = Literal["critical", "normal", "sheddable"]
WindowKind = Literal["count", "time"]

# The cap of a re-opening breaker's open time when the settings leave it unset (and
# open_seconds is shorter): also the longest a recovered upstream waits to be noticed.
DEFAULT_MAX_OPEN_SECONDS = 60.0


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
    max_open_seconds: float = DEFAULT_MAX_OPEN_SECONDS
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
    # Statuses that are a failed call once retries are spent (retry.on_status and
    # breaker.failure_status); computed here so the hot path does one set lookup.
    failure_statuses: frozenset[int] = frozenset()

    # The httpx timeout extension for an attempt with time to spare. Shared by every
    # request (httpx and httpcore only read it), so the common case allocates nothing.
    timeouts: Mapping[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.failure_statuses:
            union = self.retry.on_status | self.breaker.failure_status
            object.__setattr__(self, "failure_statuses", union)
        object.__setattr__(
            self,
            "timeouts",
            {
                "connect": self.connect_timeout,
                "read": self.read_timeout,
                "write": self.read_timeout,
                "pool": self.connect_timeout,
            },
        )
        # The longer of the two: with at least this much time left no clipping is needed.
        object.__setattr__(self, "unclipped_after", max(self.connect_timeout, self.read_timeout))

    unclipped_after: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True, eq=False)
class Policies:
    """Everything compiled from one :class:`~gateway_guard.settings.Settings`."""

    settings: Settings
    service: str
    debug: bool
    brand_app_errors: bool
    # The policy of each upstream outside any route (or when no route matches).
    calls: Mapping[str, CallPolicy]
    routes: RouteTable
    shed: ShedPolicy


def _call_policy(name: str, base_url: str | None, call: CallSettings) -> CallPolicy:
    r, b, h = call.retry, call.breaker, call.bulkhead
    return CallPolicy(
        upstream=name,
        base_url=base_url,
        connect_timeout=call.connect_timeout,
        read_timeout=call.read_timeout,
        deadline=call.deadline,
        raise_on_failure_status=call.raise_on_failure_status,
        retry=RetryPolicy(
            attempts=r.attempts,
            backoff_initial=r.backoff_initial,
            backoff_max=r.backoff_max,
            jitter=r.jitter,
            on_status=frozenset(r.on_status),
            methods=frozenset(m.upper() for m in r.methods),
            retry_non_idempotent=r.retry_non_idempotent,
            budget_ratio=r.budget_ratio,
            budget_min_per_second=r.budget_min_per_second,
            respect_retry_after=r.respect_retry_after,
            max_retry_after=r.max_retry_after,
        ),
        breaker=BreakerPolicy(
            enabled=b.enabled,
            failure_rate=b.failure_rate,
            window=b.window,
            window_size=b.window_size,
            min_calls=b.min_calls,
            open_seconds=b.open_seconds,
            max_open_seconds=(
                b.max_open_seconds
                if b.max_open_seconds is not None
                else max(DEFAULT_MAX_OPEN_SECONDS, b.open_seconds)
            ),
            half_open_calls=b.half_open_calls,
            slow_call_seconds=b.slow_call_seconds,
            slow_call_rate=b.slow_call_rate,
            failure_status=frozenset(b.failure_status),
        ),
        bulkhead=BulkheadPolicy(max_concurrent=h.max_concurrent, max_wait=h.max_wait),
    )


def _shed_policy(shed: ShedSettings) -> ShedPolicy:
    return ShedPolicy(
        max_concurrent=shed.max_concurrent,
        max_queue=shed.max_queue,
        queue_timeout=shed.queue_timeout,
    )


def compile_route(
    settings: Settings, index: int, rs: RouteSettings, calls: Mapping[str, CallPolicy]
) -> Route:
    """One route's policies: each upstream's, layered under the route's own keys."""
    route_calls: dict[str, CallPolicy] = {}
    for name, up in settings.upstreams.items():
        policy = _call_policy(name, up.base_url, effective_call(settings, name, rs))
        route_calls[name] = calls[name] if policy == calls[name] else policy
    route_shed = merge_shed(settings.shed, rs)
    return Route(
        index=index,
        pattern=rs.path,
        name=rs.name or rs.path,
        methods=frozenset(m.upper() for m in rs.methods) if rs.methods else None,
        priority=rs.priority,
        depends_on=tuple(rs.depends_on),
        deadline=rs.deadline,
        shed=_shed_policy(route_shed) if route_shed is not None else None,
        calls=route_calls,
    )


# What a per-view policy (Flask's @ext.policy, Django's @gateway_policy) may set: by the
# time a view runs, routing and shedding have happened, so those keys cannot apply.
VIEW_KEYS = frozenset(
    {
        "retry",
        "deadline",
        "connect_timeout",
        "read_timeout",
        "raise_on_failure_status",
        "depends_on",
    }
)


def compile_view_policy(policies: Policies, view: str, overrides: Mapping[str, object]) -> Route:
    """A route policy for one view, from keyword overrides validated like settings.

    Raises :class:`~gateway_guard.SettingsError` naming ``view <name>.<key>``.
    """
    from .settings import validate_view_overrides  # noqa: PLC0415 - avoids a cycle

    settings = policies.settings
    where = f"view {view}"
    unknown = sorted(set(overrides) - VIEW_KEYS)
    if unknown:
        allowed = ", ".join(sorted(VIEW_KEYS))
        raise SettingsError(
            [
                SettingsProblem(f"{where}.{key}", f"not allowed per view (allowed: {allowed})")
                for key in unknown
            ]
        )
    rs = validate_view_overrides(settings, where, {"path": "/", "name": view, **overrides})
    route = compile_route(settings, -1, rs, policies.calls)
    # Priority and shedding were decided before the view ran; a view policy has neither.
    return Route(
        index=-1,
        pattern=route.pattern,
        name=view,
        depends_on=route.depends_on,
        deadline=route.deadline,
        calls=route.calls,
    )


def compile_policies(settings: Settings) -> Policies:
    """Compile validated settings into the frozen objects the hot path reads.

    Layering is ``defaults`` < ``upstreams.<name>`` < the route, merged per key. Identical
    effective policies are shared, so breakers and budgets can be keyed by upstream while
    a route only changes what a route may change (timeouts, deadline, retries).
    """
    calls = {
        name: _call_policy(name, up.base_url, effective_call(settings, name, None))
        for name, up in settings.upstreams.items()
    }
    routes = [compile_route(settings, index, rs, calls) for index, rs in enumerate(settings.routes)]
    return Policies(
        settings=settings,
        service=settings.service,
        debug=settings.debug,
        brand_app_errors=settings.brand_app_errors,
        calls=calls,
        routes=RouteTable(routes, settings.shed.exempt),
        shed=_shed_policy(settings.shed),
    )
