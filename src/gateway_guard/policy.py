"""Frozen runtime policies, compiled once from validated settings; and the layering.

The hot path only reads these: every field is already in the form it is used in
(frozensets for membership, floats in seconds, precomputed flags). Layering is
``defaults`` < ``upstreams.<name>`` < the matching ``routes`` entry, merged per key; it
is done here only (:func:`effective_call`), and the settings checks use it too. Each
policy's defaults are read from the settings schema, where every default is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ._schema import (
    DEFAULT_MAX_OPEN_SECONDS,
    BreakerSettings,
    CallSettings,
    RouteSettings,
    Settings,
    SettingsModel,
    ShedSettings,
    UpstreamSettings,
    WindowKind,
)

# `import X as X`: re-exported for code written before this module was split; not API
# (docs/api.md lists what is), so not in __all__.
from ._schema import Priority as Priority
from .errors import SettingsError, SettingsProblem
from .routing import Route, RouteTable

__all__: list[str] = []

# The schema's defaults, which are the policies' defaults: each is written once, there.
_CALL: Final = CallSettings()
_RETRY: Final = _CALL.retry
_BREAKER: Final = _CALL.breaker
_BULKHEAD: Final = _CALL.bulkhead
_SHED: Final = ShedSettings()


def _methods(methods: Iterable[str]) -> frozenset[str]:
    return frozenset(m.upper() for m in methods)


def _max_open_seconds(breaker: BreakerSettings) -> float:
    if breaker.max_open_seconds is not None:
        return breaker.max_open_seconds
    return max(DEFAULT_MAX_OPEN_SECONDS, breaker.open_seconds)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = _RETRY.attempts
    backoff_initial: float = _RETRY.backoff_initial
    backoff_max: float = _RETRY.backoff_max
    jitter: bool = _RETRY.jitter
    on_status: frozenset[int] = frozenset(_RETRY.on_status)
    methods: frozenset[str] = _methods(_RETRY.methods)
    retry_non_idempotent: bool = _RETRY.retry_non_idempotent
    budget_ratio: float = _RETRY.budget_ratio
    budget_min_per_second: float = _RETRY.budget_min_per_second
    respect_retry_after: bool = _RETRY.respect_retry_after
    max_retry_after: float = _RETRY.max_retry_after
    buffer_body_bytes: int = _RETRY.buffer_body_bytes

    @property
    def enabled(self) -> bool:
        return self.attempts > 1


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    enabled: bool = _BREAKER.enabled
    failure_rate: float = _BREAKER.failure_rate
    window: WindowKind = _BREAKER.window
    window_size: int = _BREAKER.window_size
    min_calls: int = _BREAKER.min_calls
    open_seconds: float = _BREAKER.open_seconds
    # Each re-open from half-open doubles the open time, up to this cap (then jittered).
    max_open_seconds: float = _max_open_seconds(_BREAKER)
    half_open_calls: int = _BREAKER.half_open_calls
    slow_call_seconds: float = _BREAKER.slow_call_seconds
    slow_call_rate: float = _BREAKER.slow_call_rate
    failure_status: frozenset[int] = frozenset(_BREAKER.failure_status)
    consecutive_timeouts: int = _BREAKER.consecutive_timeouts


@dataclass(frozen=True, slots=True)
class BulkheadPolicy:
    max_concurrent: int = _BULKHEAD.max_concurrent
    max_wait: float = _BULKHEAD.max_wait


@dataclass(frozen=True, slots=True)
class ShedPolicy:
    """Inbound concurrency limit. ``max_concurrent == 0`` means no limit."""

    max_concurrent: int = _SHED.max_concurrent
    max_queue: int = _SHED.max_queue
    queue_timeout: float = _SHED.queue_timeout

    @property
    def enabled(self) -> bool:
        return self.max_concurrent > 0


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Everything one outbound call to ``upstream`` needs, for one route (or no route)."""

    upstream: str
    base_url: str | None = None
    connect_timeout: float = _CALL.connect_timeout
    read_timeout: float = _CALL.read_timeout
    deadline: float = _CALL.deadline
    raise_on_failure_status: bool = _CALL.raise_on_failure_status
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
            methods=_methods(r.methods),
            retry_non_idempotent=r.retry_non_idempotent,
            budget_ratio=r.budget_ratio,
            budget_min_per_second=r.budget_min_per_second,
            respect_retry_after=r.respect_retry_after,
            max_retry_after=r.max_retry_after,
            buffer_body_bytes=r.buffer_body_bytes,
        ),
        breaker=BreakerPolicy(
            enabled=b.enabled,
            failure_rate=b.failure_rate,
            window=b.window,
            window_size=b.window_size,
            min_calls=b.min_calls,
            open_seconds=b.open_seconds,
            max_open_seconds=_max_open_seconds(b),
            half_open_calls=b.half_open_calls,
            slow_call_seconds=b.slow_call_seconds,
            slow_call_rate=b.slow_call_rate,
            failure_status=frozenset(b.failure_status),
            consecutive_timeouts=b.consecutive_timeouts,
        ),
        bulkhead=BulkheadPolicy(max_concurrent=h.max_concurrent, max_wait=h.max_wait),
    )


def _shed_policy(shed: ShedSettings) -> ShedPolicy:
    return ShedPolicy(
        max_concurrent=shed.max_concurrent,
        max_queue=shed.max_queue,
        queue_timeout=shed.queue_timeout,
    )


# --- layering: defaults < upstream < route, merged per key ------------------------------


def _override(base: SettingsModel, over: SettingsModel | None) -> Any:
    """``base`` with the keys the user set in ``over`` (per key, nested sections merged)."""
    if over is None:
        return base
    updates: dict[str, Any] = {}
    for key in over.model_fields_set:
        if key not in type(base).model_fields:
            continue
        value = getattr(over, key)
        current = getattr(base, key)
        if isinstance(value, SettingsModel) and isinstance(current, SettingsModel):
            value = _override(current, value)
        if value is not None:
            updates[key] = value
    return base.model_copy(update=updates) if updates else base


def merge_call(defaults: CallSettings, upstream: UpstreamSettings) -> CallSettings:
    """An upstream's call settings: the defaults with the keys the upstream set."""
    merged: CallSettings = _override(defaults, upstream)
    return merged


def merge_route(base: CallSettings, route: RouteSettings) -> CallSettings:
    """``base`` (an upstream's, or the defaults) with the keys a route set."""
    merged: CallSettings = _override(base, route)
    # A route's deadline is the whole inbound request's: it caps an upstream's own call
    # deadline but never loosens a tighter one.
    if route.deadline is not None and base.deadline < route.deadline:
        merged = merged.model_copy(update={"deadline": base.deadline})
    return merged


def merge_shed(app: ShedSettings, route: RouteSettings) -> ShedSettings | None:
    """A route's own shed limit (app values for keys it did not set), or None."""
    if route.shed is None:
        return None
    merged: ShedSettings = _override(app, route.shed)
    return merged


def effective_call(settings: Settings, upstream: str, route: RouteSettings | None) -> CallSettings:
    """The layered settings for one call: defaults < upstream < route, merged per key."""
    call = settings.defaults
    if upstream in settings.upstreams:
        call = merge_call(call, settings.upstreams[upstream])
    if route is not None:
        call = merge_route(call, route)
    return call


# --- compiling ------------------------------------------------------------------------------


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
