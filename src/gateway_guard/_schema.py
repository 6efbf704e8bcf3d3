"""The settings schema: every key, its type, its bounds and its default (DESIGN §2).

This is the one place a default is written: :mod:`gateway_guard.policy` reads its own
defaults from these models, and the docs are checked against them (tests/test_docs.py).
Loading, error messages and cross-field checks live in :mod:`gateway_guard.settings` and
the private modules it names.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_MAX_OPEN_SECONDS",
    "BrandSettings",
    "BreakerSettings",
    "BulkheadSettings",
    "CallSettings",
    "HealthSettings",
    "InstrumentedClient",
    "MetricsSettings",
    "Priority",
    "RetrySettings",
    "RouteSettings",
    "Settings",
    "SettingsModel",
    "ShedSettings",
    "StateBackend",
    "StateSettings",
    "StatusSettings",
    "TracingSettings",
    "UpstreamSettings",
    "WindowKind",
]

_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)

# The longest duration any setting takes: one hour. Beyond it a timeout, deadline or
# backoff only means "forever", and values near 1e300 would overflow on the first call.
MAX_SECONDS: Final = 3600.0
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
NonNegativeSeconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
HttpStatus = Annotated[int, Field(ge=100, le=599)]
# A status worth retrying is an error: a 2xx/3xx answer is the call having worked.
RetryStatus = Annotated[int, Field(ge=400, le=599)]
# A body read ahead is held in memory by each call in flight: beyond this it is a typo.
MAX_BUFFER_BODY_BYTES: Final = 64 * 1024 * 1024
# Slots are counted, not allocated, but a limit beyond any real concurrency is a typo.
MAX_CONCURRENT: Final = 1_000_000
HttpMethod = Annotated[str, Field(pattern=r"^[A-Za-z]+$", max_length=32)]
Priority = Literal["critical", "normal", "sheddable"]
InstrumentedClient = Literal["httpx", "requests", "aiohttp"]
WindowKind = Literal["count", "time"]
StateBackend = Literal["local", "redis"]
# The store's Redis timeouts: bounded because a request never waits on them, but a probe
# admission (rare) and the background thread do, and a long one only hides an outage.
StoreSeconds = Annotated[float, Field(gt=0, le=5.0, allow_inf_nan=False)]

# The cap of a re-opening breaker's open time when the settings leave it unset (and
# open_seconds is shorter): also the longest a recovered upstream waits to be noticed.
DEFAULT_MAX_OPEN_SECONDS: Final = 60.0


class SettingsModel(BaseModel):
    """The base of every settings table: unknown keys are errors, values are frozen."""

    model_config = _MODEL_CONFIG


class RetrySettings(SettingsModel):
    """``[defaults.retry]``, ``[upstreams.NAME.retry]``, ``routes[].retry``."""

    attempts: int = Field(3, ge=1, le=10, description="Attempts in all, including the first.")
    backoff_initial: NonNegativeSeconds = Field(0.1, description="First backoff, seconds.")
    backoff_max: NonNegativeSeconds = Field(2.0, description="Longest backoff, seconds.")
    jitter: bool = Field(True, description="Randomise backoff so callers do not retry in step.")
    on_status: list[RetryStatus] = Field(
        [502, 503, 504], description="Upstream statuses that are retried."
    )
    methods: list[HttpMethod] = Field(
        ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"],
        description="Methods retried after the request may have reached the upstream. "
        "POST/PATCH are retried only with an Idempotency-Key header.",
    )
    retry_non_idempotent: bool = Field(
        False, description="Retry POST/PATCH even without an Idempotency-Key (dangerous)."
    )
    budget_ratio: Rate = Field(
        0.1, description="Retries may add at most this fraction of calls (sliding 10 s window)."
    )
    budget_min_per_second: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="Floor: adds this many retries per second of the 10 s window (a burst).",
    )
    respect_retry_after: bool = Field(True, description="Never retry before Retry-After.")
    max_retry_after: NonNegativeSeconds = Field(
        30.0, description="A longer upstream Retry-After fails fast instead of waiting."
    )
    buffer_body_bytes: int = Field(
        1024 * 1024,
        ge=0,
        le=MAX_BUFFER_BODY_BYTES,
        description="Read a retryable response body of at most this Content-Length within "
        "the attempt, so that a body that breaks off is retried (0 = never).",
    )


class BreakerSettings(SettingsModel):
    """``[defaults.breaker]``, ``[upstreams.NAME.breaker]``."""

    enabled: bool = Field(True, description="false: the breaker never opens.")
    failure_rate: Rate = Field(
        0.8, description="Open at this rate of calls failed after their retries (0-1)."
    )
    window: WindowKind = Field(
        "count", description='"count": the last window_size calls; "time": the last seconds.'
    )
    window_size: int = Field(50, ge=1, le=10_000, description="Calls, or seconds.")
    min_calls: int = Field(10, ge=1, description="Calls in the window before it may open.")
    open_seconds: PositiveSeconds = Field(30.0, description="Time open before probing.")
    max_open_seconds: PositiveSeconds | None = Field(
        None,
        description=(
            "Cap of the growing open time after failed probes; unset: "
            f"{DEFAULT_MAX_OPEN_SECONDS:g} s, or open_seconds when that is longer."
        ),
    )
    half_open_calls: int = Field(
        3,
        ge=1,
        le=1000,
        description="Probes admitted in half-open; their failure rate decides: close or re-open.",
    )
    slow_call_seconds: PositiveSeconds = Field(5.0, description="A call this long is slow.")
    slow_call_rate: Rate = Field(1.0, description="Open at this slow-call rate (1 = never).")
    failure_status: list[HttpStatus] = Field(
        [500, 502, 503, 504], description="Statuses counted as failures (never 429)."
    )
    consecutive_timeouts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Open after this many timed-out attempts in a row, without waiting for "
        "min_calls (0 = off).",
    )


class BulkheadSettings(SettingsModel):
    """``[defaults.bulkhead]``, ``[upstreams.NAME.bulkhead]``: outbound concurrency."""

    max_concurrent: int = Field(
        100, ge=0, le=MAX_CONCURRENT, description="Calls in flight (0 = unlimited)."
    )
    max_wait: NonNegativeSeconds = Field(0.0, description="Wait for a free slot (0 = fail fast).")


class ShedSettings(SettingsModel):
    """``[shed]`` and ``routes[].shed``: inbound load shedding."""

    max_concurrent: int = Field(
        200, ge=0, le=MAX_CONCURRENT, description="Requests in flight (0 = no limit)."
    )
    max_queue: int = Field(400, ge=0, le=MAX_CONCURRENT, description="Requests waiting for a slot.")
    queue_timeout: NonNegativeSeconds = Field(1.0, description="Longest wait in the queue.")
    exempt: list[str] = Field(
        ["/healthz", "/metrics"], description="Paths (or templates) never shed (app-wide only)."
    )


class CallSettings(SettingsModel):
    """``[defaults]``: applies to every upstream call."""

    # Visitor-first (#15): a hung upstream costs a visitor at most the 4 s deadline (one 3 s
    # attempt and a clipped retry), not the 9-15 s the old 2/10/15 s defaults allowed; a
    # slow-but-healthy upstream needs its own, longer settings (docs/settings.md).
    connect_timeout: PositiveSeconds = Field(1.0, description="Seconds to connect.")
    read_timeout: PositiveSeconds = Field(3.0, description="Seconds between bytes read.")
    deadline: PositiveSeconds = Field(4.0, description="One call, all retries included.")
    raise_on_failure_status: bool = Field(
        True, description="Retries spent and still a failure status: raise UpstreamStatusError."
    )
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    bulkhead: BulkheadSettings = BulkheadSettings()


class UpstreamSettings(CallSettings):
    """``[upstreams.NAME]``: one upstream; any ``defaults`` key may be overridden."""

    base_url: str | None = Field(None, description="http(s) URL the clients are based on.")
    match: list[str] = Field(
        [],
        description="Extra hosts whose calls belong to this upstream under instrumentation: "
        '"payments.internal", "*.payments.internal:8443".',
    )


class RouteSettings(SettingsModel):
    """``[[routes]]``: a route policy; the first matching entry wins."""

    path: str = Field(description="Route template: /orders/{id}, /static/{rest:path}.")
    methods: list[HttpMethod] | None = Field(
        None, min_length=1, description="Methods matched (all if unset)."
    )
    name: str | None = Field(None, max_length=100, description="Name in logs (default: path).")
    priority: Priority = Field("normal", description="Shedding order: sheddable goes first.")
    depends_on: list[str] = Field(
        [], description="Upstreams whose open breaker makes this route answer 503 at once."
    )
    connect_timeout: PositiveSeconds | None = None
    read_timeout: PositiveSeconds | None = None
    deadline: PositiveSeconds | None = Field(None, description="Inbound request deadline.")
    raise_on_failure_status: bool | None = None
    retry: RetrySettings | None = None
    shed: ShedSettings | None = None


class BrandSettings(SettingsModel):
    """``[brand]``: how the error pages look."""

    name: str = Field("", max_length=200, description="Shown in the page title and heading.")
    logo_url: str | None = Field(None, description="http(s) URL or /path of a logo image.")
    accent_color: str = Field("#2563eb", description="Hex colour: #rgb or #rrggbb.")
    support_url: str | None = Field(None, description="Where visitors can get help.")
    status_url: str | None = Field(None, description="The public status page.")
    template_dir: str | None = Field(None, description="Directory of Jinja2 overrides.")
    lang: str = Field("en", pattern=r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")
    home_url: str = Field("/", description="http(s) URL or /path: the page's way back.")
    problem_base_url: str | None = Field(
        None, description='Base of problem+json "type" URIs; unset: "about:blank".'
    )
    languages: list[str] | None = Field(
        None, max_length=100, description="Languages offered by Accept-Language; unset: all."
    )
    strings: dict[str, dict[str, str]] = Field(
        {}, description="Per language, page strings that replace the built-in ones."
    )


class StateSettings(SettingsModel):
    """``[state]``: where breaker, retry budget and manual-control state live."""

    backend: StateBackend = Field(
        "local", description='"local": per process; "redis": shared by the fleet.'
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="redis://, rediss:// or unix:// URL."
    )
    key_prefix: str | None = Field(
        None, max_length=200, description='Prefix of every key; unset: "gateway_guard:SERVICE".'
    )
    connect_timeout: StoreSeconds = Field(0.5, description="Seconds to connect to Redis.")
    command_timeout: StoreSeconds = Field(0.25, description="Seconds for one Redis command.")


# A path the middleware serves itself: absolute, plain characters, no query or fragment.
EndpointPath = Annotated[
    str,
    Field(
        pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%-][A-Za-z0-9._~!$&'()*+,;=:@%/-]*$", max_length=200
    ),
]


class StatusSettings(SettingsModel):
    """``[status]``: the operator's status page (docs/status-page.md)."""

    path: EndpointPath | None = Field(None, description="Where it is served; unset: no page.")
    token: str | None = Field(
        None,
        min_length=16,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Bearer token for actions, and for reads not from loopback.",
    )


class HealthSettings(SettingsModel):
    """``[health]``: a liveness endpoint served by the middleware."""

    path: EndpointPath | None = Field(None, description="Where it is served; unset: none.")


class MetricsSettings(SettingsModel):
    """``[metrics]``: Prometheus metrics (the ``prometheus`` extra)."""

    enabled: bool = Field(False, description="Record Prometheus metrics (on when path is set).")
    path: EndpointPath | None = Field(
        None, description="Serve them here from the middleware, e.g. /metrics (unset: none)."
    )


class TracingSettings(SettingsModel):
    """``[tracing]``: OpenTelemetry spans (the ``otel`` extra) and trace context."""

    enabled: bool = Field(False, description="A span per guarded call and per attempt.")
    start_traces: bool = Field(
        False,
        description="Without OpenTelemetry, send a new traceparent when the request had none.",
    )


class Settings(SettingsModel):
    """The whole gateway_guard configuration (DESIGN §2)."""

    service: str = Field("gateway-guard", description="Deployment name; the Proxy-Status member.")
    debug: bool = Field(False, description="Rich diagnostics in pages and headers. Never in prod.")
    brand_app_errors: bool = Field(
        False, description="Also brand 502/503/504 responses that the app returns itself."
    )
    brand: BrandSettings = BrandSettings()
    defaults: CallSettings = CallSettings()
    upstreams: dict[str, UpstreamSettings] = {}
    shed: ShedSettings = ShedSettings()
    routes: list[RouteSettings] = []
    instrument: list[InstrumentedClient] = Field(
        [],
        description="HTTP client libraries whose calls to an upstream's hosts are guarded "
        "without code changes (empty: nothing is patched).",
    )
    status: StatusSettings = StatusSettings()
    health: HealthSettings = HealthSettings()
    state: StateSettings = StateSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
