"""Django, configured once for the whole test process.

Django's settings can be configured only once per process, and two test modules use
Django: test_django.py (whose module is the project's URLconf and holds its middleware)
and test_adapter_contract.py (which overrides ROOT_URLCONF, MIDDLEWARE and GATEWAY_GUARD
for its own tests). Whichever is imported first imports this module, so the project is
test_django.py's either way.
"""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings

MIDDLEWARE = "gateway_guard.django.GatewayGuardMiddleware"
BRAND = {"name": "Acme Shop", "status_url": "https://status.acme.example"}
QUIET_BREAKER = {"window_size": 1000, "min_calls": 1000, "consecutive_timeouts": 0}
SHORT_READ = 0.3


def gg_settings(url: str = "http://127.0.0.1:9", **extra: Any) -> dict[str, Any]:
    """gateway_guard settings with upstream ``up`` at ``url``; keywords are top-level keys."""
    defaults = {
        "connect_timeout": 1.0,
        "read_timeout": SHORT_READ,
        "deadline": 3.0,
        "retry": {"attempts": 1},
        "breaker": QUIET_BREAKER,
        **extra.pop("defaults", {}),
    }
    return {
        "service": "shop",
        "brand": BRAND,
        "defaults": defaults,
        "upstreams": {"up": {"base_url": url}},
        **extra,
    }


if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="gateway-guard-tests-only",
        ALLOWED_HOSTS=["127.0.0.1", "testserver"],
        ROOT_URLCONF="test_django",
        INSTALLED_APPS=["gateway_guard.django"],
        MIDDLEWARE=[MIDDLEWARE, "test_django.InnerMiddleware"],
        GATEWAY_GUARD=gg_settings(),
        # Leave the process's logging alone: other test modules share it.
        LOGGING_CONFIG=None,
    )
    django.setup()
