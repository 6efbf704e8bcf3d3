"""gateway_guard: resilient outbound HTTP calls and honest gateway error pages.

Guard your app's calls to its upstreams with budgeted safe retries, circuit breakers and
load shedding; when an upstream still fails, answer with a branded 502/503/504 page and
standard diagnostic headers (RFC 9209 ``Proxy-Status``).
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .asgi import GatewayGuardMiddleware
from .breaker import BreakerSnapshot, BreakerState, CircuitBreaker, Transition
from .context import RequestContext, current_context, current_guard
from .errors import (
    CircuitOpenError,
    GatewayGuardError,
    LoadShedError,
    SettingsError,
    SettingsProblem,
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from .guard import Guard
from .limiter import ConcurrencyLimiter
from .settings import Settings, load_settings
from .wsgi import GatewayGuardWSGI

try:
    __version__ = _version("gateway-guard")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcurrencyLimiter",
    "GatewayGuardError",
    "GatewayGuardMiddleware",
    "GatewayGuardWSGI",
    "Guard",
    "LoadShedError",
    "RequestContext",
    "Settings",
    "SettingsError",
    "SettingsProblem",
    "Transition",
    "UpstreamConfigError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "__version__",
    "current_context",
    "current_guard",
    "load_settings",
]
