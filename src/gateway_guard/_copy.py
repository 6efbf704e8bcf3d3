"""What the visitor is told: the words of every gateway error, chosen by situation.

An error is reduced to a *situation* (``timeout``, ``unavailable``, ``overloaded`` ...);
each situation has one heading and message, shared by the HTML page, the plain text and
problem+json's ``detail``. :class:`Page` is everything a body says apart from the
per-request request id and time, so the bodies built from it can be cached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

__all__ = [
    "CAUTION",
    "COPY",
    "PHRASES",
    "Page",
    "app_situation",
    "classify_method",
    "duration_words",
    "situation_of",
]


# One (heading, message) per situation, shared by the page, the plain text and problem+json's
# "detail". Plain words, no internals: these are shown in production. A translated template
# switches on the ``situation`` variable instead of using these English strings.
COPY: Final[Mapping[str, tuple[str, str]]] = {
    "timeout": ("This is taking too long", "A service we depend on did not answer in time."),
    "unreachable": (
        "We can't reach part of our service",
        "A service we depend on could not be reached.",
    ),
    "bad_response": (
        "Something went wrong on our side",
        "A service we depend on sent us an answer we could not use.",
    ),
    "error_status": (
        "Something went wrong on our side",
        "A service we depend on answered with an error.",
    ),
    "unavailable": (
        "Temporarily unavailable",
        "A service we depend on is having problems, so we are pausing requests to it "
        "briefly to let it recover.",
    ),
    "overloaded": (
        "We're very busy right now",
        "We are receiving more requests than we can handle at the moment.",
    ),
    "misconfigured": (
        "Something went wrong on our side",
        "A problem with our setup stops us from reaching a service we depend on.",
    ),
    "app_error": (
        "Something went wrong on our side",
        "We could not complete your request because of a problem on our side.",
    ),
    "app_unavailable": ("Temporarily unavailable", "This service is temporarily unavailable."),
    "app_timeout": ("This is taking too long", "We could not complete your request in time."),
}

_TIMEOUT_ERRORS = frozenset(
    {
        "dns_timeout",
        "connection_timeout",
        "connection_read_timeout",
        "connection_write_timeout",
        "http_response_timeout",
    }
)
_UNREACHABLE_ERRORS = frozenset(
    {
        "dns_error",
        "destination_not_found",
        "destination_ip_prohibited",
        "destination_ip_unroutable",
        "connection_refused",
        "tls_protocol_error",
        "tls_certificate_error",
        "tls_alert_received",
    }
)
_SETUP_ERRORS = frozenset(
    {
        "proxy_configuration_error",
        "proxy_internal_error",
        "proxy_internal_response",
        "proxy_loop_detected",
        "http_request_error",
    }
)

CAUTION = (
    "If you were sending something, such as a form, an order or a payment, check whether "
    "it went through before you send it again, so that it is not done twice."
)
# Methods whose repetition is harmless (RFC 9110 §9.2.2). Only GET and HEAD get a "Try
# again" link: the link reloads the address with GET, which is a different request for
# anything else.
_RELOADABLE_METHODS = frozenset({"GET", "HEAD"})
_IDEMPOTENT_METHODS = frozenset({"PUT", "DELETE", "OPTIONS", "TRACE"})

PHRASES: Final[Mapping[int, str]] = {s.value: s.phrase for s in HTTPStatus if 500 <= s.value <= 599}


@dataclass(frozen=True, slots=True)
class Page:
    """Everything a body says, except the per-request request id and time."""

    status: int
    situation: str
    proxy_error: str | None
    received_status: int | None
    retry_after: int | None
    retry_link: bool
    caution: bool
    app: bool  # a status the app returned itself (render_status)
    details: Mapping[str, Any] | None = None  # debug mode only

    @property
    def status_phrase(self) -> str:
        return PHRASES.get(self.status, "Server Error")

    @property
    def advice(self) -> str:
        if self.retry_after is not None:
            return f"Please try again in {duration_words(self.retry_after)}."
        if self.situation == "misconfigured":
            return "Trying again will probably not help until we have fixed it."
        return "Please try again in a few moments."


def duration_words(seconds: int) -> str:
    """``seconds`` as a visitor reads it: "5 seconds", "2 minutes", "1 hour"."""
    if seconds < 90:
        return "1 second" if seconds == 1 else f"{seconds} seconds"
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"{minutes} minutes"
    hours = math.ceil(seconds / 3600)
    return "1 hour" if hours == 1 else f"{hours} hours"


def situation_of(status: int, proxy_error: str | None, known_error: bool) -> str:
    """The situation of an error: its status and its (known or unknown) Proxy-Status type."""
    if proxy_error is None:
        return "error_status"
    if known_error:
        if proxy_error in _TIMEOUT_ERRORS:
            return "timeout"
        if proxy_error in _UNREACHABLE_ERRORS:
            return "unreachable"
        if proxy_error == "connection_limit_reached":
            return "overloaded"
        if proxy_error == "destination_unavailable":
            # 503: our breaker is open. httpx's ProxyError also maps here, as a 502.
            return "unavailable" if status == 503 else "unreachable"
        if proxy_error in _SETUP_ERRORS:
            return "misconfigured"
        return "bad_response"
    # An error type outside RFC 9209's registry says nothing we can trust; the status does.
    return {503: "unavailable", 504: "timeout"}.get(status, "bad_response")


def classify_method(method: object) -> str:
    """What a retry of ``method`` means: ``reload``, ``idempotent`` or ``unsafe``."""
    name = method.upper() if isinstance(method, str) else ""
    if name in _RELOADABLE_METHODS:
        return "reload"
    if name in _IDEMPOTENT_METHODS:
        return "idempotent"
    return "unsafe"


def app_situation(status: int) -> str:
    """The situation of a 502/503/504 that the app itself returned."""
    return {503: "app_unavailable", 504: "app_timeout"}.get(status, "app_error")
