"""Answered gateway errors, shown to Sentry when the app uses it.

Sentry's framework integrations report the exceptions that escape the app; a gateway
error never does (we answer it with our page), so without this an outage of an upstream
leaves Sentry silent. One event per logged gateway error line, so the same throttle holds
(one a second per upstream and error type; ``suppressed`` counts the rest), grouped into
one Sentry issue per upstream and error type by the fingerprint.

sentry_sdk is never imported here: it is used only when the app imported it already, and
only when ``sentry_sdk.init()`` made a client active. Its failures never reach the request.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

from .errors import UpstreamError

_modules = sys.modules


def capture(error: UpstreamError, fields: Mapping[str, Any]) -> None:
    """Send ``error`` to Sentry as an event, when a Sentry client is active."""
    sdk: Any = _modules.get("sentry_sdk")
    if sdk is None:
        return
    with contextlib.suppress(Exception):  # as Sentry's own capture_internal_exceptions
        if not sdk.get_client().is_active():
            return
        kind = error.proxy_error or f"received-status={error.received_status}"
        upstream = error.upstream or "-"
        sdk.capture_exception(
            error,
            level="warning" if error.status == 503 else "error",
            fingerprint=["gateway_guard", upstream, kind],
            tags={
                "gateway_guard.upstream": upstream,
                "gateway_guard.proxy_error": kind,
                "gateway_guard.status": str(error.status),
                "gateway_guard.route": str(fields.get("route") or "-"),
                "request_id": str(fields.get("request_id")),
            },
            contexts={"gateway_guard": dict(fields)},
        )
