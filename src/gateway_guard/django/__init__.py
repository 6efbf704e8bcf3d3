"""Django adapter: middleware, per-view policies, the process's Guard and system checks.

::

    INSTALLED_APPS = [..., "gateway_guard.django"]
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "gateway_guard.django.GatewayGuardMiddleware",
        ...
    ]
    GATEWAY_GUARD = {"service": "shop", "upstreams": {"payments": {"base_url": "..."}}}

See docs/django.md.
"""

from __future__ import annotations

try:
    import django  # noqa: F401 - only to fail early with a helpful message
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "gateway_guard.django needs Django: pip install 'gateway-guard[django]'"
    ) from exc

from .conf import get_guard
from .decorators import gateway_policy
from .middleware import GatewayErrorResponse, GatewayGuardMiddleware
from .views import metrics_view

__all__ = [
    "GatewayErrorResponse",
    "GatewayGuardMiddleware",
    "gateway_policy",
    "get_guard",
    "metrics_view",
]
