"""What the visitor is told: the words of every gateway error, chosen by situation.

An error is reduced to a *situation* (``timeout``, ``unavailable``, ``overloaded`` ...);
each situation has one heading and message, shared by the HTML page, the plain text and
problem+json's ``detail``. :class:`Words` holds one language's strings (English here, the
others in :mod:`._translations`, chosen by :mod:`._languages`). :class:`Page` is
everything a body says apart from the per-request request id and time, so the bodies
built from it can be cached.
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
    "ENGLISH",
    "ENGLISH_WORDS",
    "PHRASES",
    "Page",
    "Words",
    "app_situation",
    "classify_method",
    "direction",
    "duration_words",
    "plural_category",
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

#: Every string a page, a plain-text body or a problem+json says, in English: the source of
#: every translation, and the keys ``[brand.strings.<language>]`` may replace.
ENGLISH: Final[Mapping[str, str]] = {
    "error_code": "Error {status}: {phrase}",
    **{f"phrase_{status}": PHRASES[status] for status in (500, 502, 503, 504)},
    **{
        f"{situation}_{part}": text
        for situation, pair in COPY.items()
        for part, text in zip(("heading", "message"), pair, strict=True)
    },
    "not_your_device": "It is not a problem with your device or your internet connection.",
    "advice_wait": "Please try again in {duration}.",
    "advice_soon": "Please try again in a few moments.",
    "advice_misconfigured": "Trying again will probably not help until we have fixed it.",
    "caution": CAUTION,
    "resubmit": "To try again, go back to the previous page and send the form again.",
    "try_again": "Try again",
    "countdown_wait": "You can try again in",
    "countdown_done": "You can try again now.",
    "home": "Go to the home page",
    "status_page": "Check our status page",
    "support": "Contact support",
    "reference": (
        "If you contact us about this, please quote the reference {reference} and the time, {time}."
    ),
    "status_page_label": "Status page",
    "support_label": "Support",
    "reference_label": "Reference",
    "second_one": "{n} second",
    "second_other": "{n} seconds",
    "minute_one": "{n} minute",
    "minute_other": "{n} minutes",
    "hour_one": "{n} hour",
    "hour_other": "{n} hours",
}
# Each language's plural categories for whole numbers (CLDR). A language not listed has
# English's: "one" for 1, "other" for the rest.
_NO_PLURAL = frozenset({"ja", "zh", "ko", "vi", "th", "id", "ms", "my", "lo", "km"})
_ONE_FOR_ZERO = frozenset({"fr", "pt"})  # CLDR: i = 0,1 is "one" (pt-PT aside)


def plural_category(language: str, n: int) -> str:
    """The CLDR plural category of the whole number ``n`` in ``language``."""
    primary = language.split("-", 1)[0].lower()
    if primary in _NO_PLURAL:
        return "other"
    if primary == "ar":
        rest = n % 100
        if n == 0:
            return "zero"
        if n in (1, 2):
            return "one" if n == 1 else "two"
        if 3 <= rest <= 10:
            return "few"
        return "many" if 11 <= rest <= 99 else "other"
    if n == 1 or (n == 0 and primary in _ONE_FOR_ZERO):
        return "one"
    return "other"


# Scripts and languages written right to left (by primary subtag, or a script subtag).
_RTL_LANGUAGES = frozenset({"ar", "he", "fa", "ur", "yi", "ps", "dv", "ckb", "sd", "ug", "syr"})
_RTL_SCRIPTS = frozenset({"arab", "hebr", "thaa", "syrc", "nkoo", "adlm", "rohg"})


def direction(language: str) -> str:
    """``"rtl"`` or ``"ltr"``: the ``dir`` of a page in ``language``."""
    primary, *subtags = language.lower().split("-")
    for subtag in subtags:
        if len(subtag) == 4:  # a script subtag decides (az-Arab is right to left)
            return "rtl" if subtag in _RTL_SCRIPTS else "ltr"
    return "rtl" if primary in _RTL_LANGUAGES else "ltr"


class Words:
    """One language's strings: ``tag`` (the page's ``lang``), ``dir`` and every key of
    :data:`ENGLISH` (a complete mapping: :mod:`._languages` merges and checks it)."""

    __slots__ = ("dir", "strings", "tag")

    def __init__(self, tag: str, strings: Mapping[str, str]) -> None:
        self.tag = tag
        self.dir = direction(tag)
        self.strings = dict(strings)

    def __getitem__(self, key: str) -> str:
        return self.strings[key]

    def phrase(self, status: int) -> str:
        """The status phrase ("Service Unavailable"), translated where we have one."""
        return self.strings.get(f"phrase_{status}") or PHRASES.get(status, "Server Error")

    def duration(self, seconds: int) -> str:
        """``seconds`` as a visitor reads it: "5 seconds", "2 minutes", "1 hour"."""
        if seconds < 90:
            unit, n = "second", seconds
        elif (minutes := math.ceil(seconds / 60)) < 90:
            unit, n = "minute", minutes
        else:
            unit, n = "hour", math.ceil(seconds / 3600)
        category = plural_category(self.tag, n)
        text = self.strings.get(f"{unit}_{category}") or self.strings[f"{unit}_other"]
        return text.replace("{n}", str(n))


ENGLISH_WORDS: Final = Words("en", ENGLISH)


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
    words: Words = ENGLISH_WORDS
    resubmit: bool = False  # answered a method other than GET/HEAD: send the form again

    @property
    def status_phrase(self) -> str:
        return self.words.phrase(self.status)

    @property
    def heading(self) -> str:
        return self.words[f"{self.situation}_heading"]

    @property
    def message(self) -> str:
        return self.words[f"{self.situation}_message"]

    @property
    def advice(self) -> str:
        if self.retry_after is not None:
            return self.words["advice_wait"].replace(
                "{duration}", self.words.duration(self.retry_after)
            )
        if self.situation == "misconfigured":
            return self.words["advice_misconfigured"]
        return self.words["advice_soon"]


def duration_words(seconds: int) -> str:
    """``seconds`` as a visitor reads it in English: "5 seconds", "2 minutes", "1 hour"."""
    return ENGLISH_WORDS.duration(seconds)


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
