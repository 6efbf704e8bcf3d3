"""Gateway error responses: content negotiation, the branded page, problem+json, plain text.

:class:`ErrorRenderer` turns an :class:`~gateway_guard.errors.UpstreamError` into a complete
response (:class:`RenderedError`: status, headers, body) and never raises: whatever goes
wrong while rendering, it logs and answers with :meth:`ErrorRenderer.fallback`, so a bug in
our diagnostics (or in a user's template) can never turn a 502 into a 500.

During an outage the same few pages are sent thousands of times a second, so every body is
rendered once per distinct situation (status, error type, received status, Retry-After,
media type, kind of method) with marker strings where the request id and the time go, and
kept as a ``bytes`` %-format; a request then costs one dict lookup and one ``%``. The cache
is bounded. Debug mode renders every response afresh (it shows per-request details).

Nothing here imports a web framework: the middlewares send the result as it is.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import jinja2

from .errors import UpstreamError
from .headers import PROXY_ERROR_TYPES, format_retry_after, proxy_status, server_timing
from .settings import BrandSettings, Settings

__all__ = [
    "DEFAULT_503_RETRY_AFTER",
    "PALETTE",
    "PROBLEM_TYPE_BASE",
    "ErrorRenderer",
    "Media",
    "RenderedError",
    "contrast_ratio",
    "negotiate",
]

logger = logging.getLogger("gateway_guard")

Media = Literal["html", "json", "text"]

# problem+json "type" URIs are this page's anchors, one per Proxy-Status error type (plus
# "upstream_status" for a failure status the upstream answered). RFC 9457 §3.1.1 asks that
# a type URI, when dereferenced, documents the problem: the error-pages doc does, and we
# control it (a made-up domain could be registered by anyone). Errors that the app itself
# returned carry no more meaning than their status, which is what "about:blank" says.
PROBLEM_TYPE_BASE: Final = (
    "https://github.com/gateway-guard/gateway-guard/blob/main/docs/error-pages.md"
)
# A 503 tells the client to come back later; without a number, well-behaved clients guess
# (often "at once"). Five seconds lets a shed burst drain without making visitors wait long.
DEFAULT_503_RETRY_AFTER: Final = 5

_CACHE_SIZE = 256
_NEGOTIATION_CACHE_SIZE = 256
# Real Accept headers are under 300 characters; only a hostile one is longer. Parsing stops
# here, and at this many media ranges, so a huge header costs a bounded amount of work.
_MAX_ACCEPT_LENGTH = 2048
_MAX_MEDIA_RANGES = 64
# Only short values are remembered: hostile ones would evict the browsers' few real strings.
_MAX_CACHED_ACCEPT_LENGTH = 512
_FAILURE_LOG_INTERVAL = 10.0
_MAX_EXCEPTION_TEXT = 2000
_CAUSE_LIMIT = 5

# --- the result -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenderedError:
    """A complete gateway error response.

    ``headers`` are ready to send: lower-case names (as ASGI requires; HTTP field names are
    case-insensitive), printable ASCII values without CR/LF. ``body`` is ``b""`` for HEAD,
    while ``content-length`` still gives the length of the GET body (RFC 9110 §9.3.2).
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes


# --- content negotiation ------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


def _better(current: float | None, q: float) -> float:
    # A range listed twice counts with its better weight: lenient, and order-independent.
    return q if current is None or q > current else current


def negotiate(accept: str | bytes | None) -> Media:
    """Which body to send for an ``Accept`` header: ``"html"``, ``"json"`` or ``"text"``.

    Each kind gets the weight (q) of the most specific media range that matches it
    (RFC 9110 §12.5.1):

    - ``"json"`` (application/problem+json): ``application/problem+json``, else the better
      of ``application/json`` and ``application/*+json``, else ``application/*``.
    - ``"html"``: ``text/html`` only. Wildcards never select HTML: a client that wants a
      page for people says so (every browser navigation lists ``text/html`` first), while
      ``*/*`` alone comes from curl, fetch() and HTTP libraries.
    - ``"text"``: ``text/plain``, else ``text/*``, else ``*/*``.

    The highest weight wins; ties go to json, then html, then text. A missing, empty or
    unparsable header, or one that accepts none of the three, gives ``"text"``: a gateway
    error must reach the client, and RFC 9110 lets us disregard Accept rather than send 406.
    Malformed ranges and invalid q-values are skipped; only the first 2048 characters and
    64 ranges are read.

    >>> negotiate("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
    'html'
    >>> negotiate("*/*"), negotiate("application/json, text/plain, */*")
    ('text', 'json')
    """
    if not accept:
        return "text"
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    html_q = problem_q = json_q = app_q = plain_q = text_q = any_q = None
    for item in accept[:_MAX_ACCEPT_LENGTH].split(",", _MAX_MEDIA_RANGES)[:_MAX_MEDIA_RANGES]:
        media_range, *params = item.split(";")
        kind, slash, sub = media_range.strip(" \t").lower().partition("/")
        if not slash or not _TOKEN_RE.fullmatch(kind) or not _TOKEN_RE.fullmatch(sub):
            continue
        if kind == "*" and sub != "*":
            continue  # "*/json" is not a media range
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip(" \t").lower() == "q":
                value = value.strip(" \t")
                q = float(value) if _QVALUE_RE.fullmatch(value) else -1.0
                break  # anything after q is an accept-ext, which we have no use for
        if q < 0:
            continue
        if kind == "text":
            if sub == "html":
                html_q = _better(html_q, q)
            elif sub == "plain":
                plain_q = _better(plain_q, q)
            elif sub == "*":
                text_q = _better(text_q, q)
        elif kind == "application":
            if sub == "problem+json":
                problem_q = _better(problem_q, q)
            elif sub in ("json", "*+json"):
                json_q = _better(json_q, q)
            elif sub == "*":
                app_q = _better(app_q, q)
        elif kind == "*":
            any_q = _better(any_q, q)
    weights: tuple[tuple[float, Media], ...] = (
        (_first(problem_q, json_q, app_q), "json"),
        (_first(html_q), "html"),
        (_first(plain_q, text_q, any_q), "text"),
    )
    best_q, best = max(weights, key=lambda pair: pair[0])  # max() keeps the first of equals
    return best if best_q > 0 else "text"


def _first(*weights: float | None) -> float:
    """The most specific range's weight: the first that was listed, else 0 (not acceptable)."""
    for q in weights:
        if q is not None:
            return q
    return 0.0


# --- what the visitor is told ---------------------------------------------------------------

# One (heading, message) per situation, shared by the page, the plain text and problem+json's
# "detail". Plain words, no internals: these are shown in production. A translated template
# switches on the ``situation`` variable instead of using these English strings.
_COPY: Final[Mapping[str, tuple[str, str]]] = {
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

_CAUTION = (
    "If you were sending something, such as a form, an order or a payment, check whether "
    "it went through before you send it again, so that it is not done twice."
)
# Methods whose repetition is harmless (RFC 9110 §9.2.2). Only GET and HEAD get a "Try
# again" link: the link reloads the address with GET, which is a different request for
# anything else.
_RELOADABLE_METHODS = frozenset({"GET", "HEAD"})
_IDEMPOTENT_METHODS = frozenset({"PUT", "DELETE", "OPTIONS", "TRACE"})

_PHRASES: Final[Mapping[int, str]] = {
    s.value: s.phrase for s in HTTPStatus if 500 <= s.value <= 599
}

# The default page's colours. Body text is near-black on white (17:1) or near-white on
# near-black in dark mode; "muted" text still reaches 7:1. tests/test_render.py checks
# every foreground/background pair against WCAG AA.
PALETTE: Final[Mapping[str, Mapping[str, str]]] = {
    "light": {
        "bg": "#f3f4f6",
        "card": "#ffffff",
        "text": "#111827",
        "muted": "#4b5563",
        "line": "#d1d5db",
        "code": "#f3f4f6",
        "debug": "#fffbeb",
        "debug_line": "#b45309",
    },
    "dark": {
        "bg": "#030712",
        "card": "#111827",
        "text": "#f9fafb",
        "muted": "#d1d5db",
        "line": "#374151",
        "code": "#1f2937",
        "debug": "#1c1917",
        "debug_line": "#f59e0b",
    },
}


@dataclass(frozen=True, slots=True)
class _Page:
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
        return _PHRASES.get(self.status, "Server Error")

    @property
    def problem_type(self) -> str:
        if self.app:
            return "about:blank"
        return f"{PROBLEM_TYPE_BASE}#{self.proxy_error or 'upstream_status'}"

    @property
    def advice(self) -> str:
        if self.retry_after is not None:
            return f"Please try again in {_duration_words(self.retry_after)}."
        if self.situation == "misconfigured":
            return "Trying again will probably not help until we have fixed it."
        return "Please try again in a few moments."


def _duration_words(seconds: int) -> str:
    if seconds < 90:
        return "1 second" if seconds == 1 else f"{seconds} seconds"
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"{minutes} minutes"
    hours = math.ceil(seconds / 3600)
    return "1 hour" if hours == 1 else f"{hours} hours"


def _situation(status: int, proxy_error: str | None, known_error: bool) -> str:
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


# --- input hygiene --------------------------------------------------------------------------

# The request ids headers.valid_request_id accepts. The middleware sends only those; anything
# else (a bug, a direct caller) is forced into the same alphabet, so the id is the same
# string in the header and in every body and needs no escaping anywhere. It is escaped for
# each body anyway, as a second line of defence.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_NOT_REQUEST_ID_CHAR_RE = re.compile(r"[^A-Za-z0-9._:@/+=-]")
_COLOUR_RE = re.compile(r"#(?:[0-9a-fA-F]{3}){1,2}")
# settings.check_settings refuses other URLs, but a Settings built directly skips those
# checks; an href must never be javascript: or similar, so they are checked again here.
_URL_BAD = r"\x00-\x20\x7f\"'<>\\`"
_SAFE_URL_RE = re.compile(
    rf"https?://[^/{_URL_BAD}][^{_URL_BAD}]*|/(?:[^/{_URL_BAD}][^{_URL_BAD}]*)?", re.IGNORECASE
)
_CSP_HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?")
# Line breaks and other controls (C0, DEL, C1, Unicode line/paragraph separators) would let
# text forge extra lines in a plain-text body.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _clean_request_id(value: object) -> str:
    if isinstance(value, str):
        if _REQUEST_ID_RE.fullmatch(value):
            return value
        return _NOT_REQUEST_ID_CHAR_RE.sub("_", value[:128]) or "-"
    return "-"


def _clamp_status(value: object) -> int:
    # Only server errors are rendered as gateway errors; anything else is a caller's bug,
    # and 502 is the honest answer to "an upstream call failed somehow".
    return value if type(value) is int and 500 <= value <= 599 else 502


def _received(value: object) -> int | None:
    return value if type(value) is int and 100 <= value <= 999 else None


def _retry_seconds(value: object, status: int) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # At least 1: "Retry-After: 0" invites a retry storm against an upstream in trouble.
        return max(1, int(format_retry_after(value)))
    return DEFAULT_503_RETRY_AFTER if status == 503 else None


def _one_line(text: str) -> str:
    return _CONTROL_RE.sub(" ", text)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a hostile __str__ must not cost the debug page
        return f"<unprintable {type(value).__name__}>"


def _exception_text(error: BaseException) -> str:
    lines = [f"{type(error).__name__}: {_safe_str(error)}"]
    seen = {id(error)}
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen and len(lines) <= _CAUSE_LIMIT:
        seen.add(id(cause))
        lines.append(f"caused by {type(cause).__name__}: {_safe_str(cause)}")
        cause = cause.__cause__ or cause.__context__
    return "\n".join(lines)[:_MAX_EXCEPTION_TEXT]


# --- colours --------------------------------------------------------------------------------


def _rgb(colour: str) -> tuple[int, int, int]:
    digits = colour[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def _luminance(colour: str) -> float:
    """WCAG 2 relative luminance."""

    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in _rgb(colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two ``#rgb`` / ``#rrggbb`` colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _ink(accent: str, background: str, toward: str, minimum: float = 4.5) -> str:
    """``accent`` mixed toward ``toward`` just enough to reach ``minimum`` contrast.

    Links and the button are drawn in this colour, so a pale brand colour still gives
    readable links (WCAG 1.4.3) while keeping its hue.
    """
    start, end = _rgb(accent), _rgb(toward)
    for step in range(21):
        t = step / 20
        mixed = "#" + "".join(
            f"{round(a + (b - a) * t):02x}" for a, b in zip(start, end, strict=True)
        )
        if contrast_ratio(mixed, background) >= minimum:
            return mixed
    return toward


# --- the renderer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """A cached response: static headers and the body as a %-format of its per-request slots."""

    status: int
    media: Media
    headers: tuple[tuple[str, str], ...]
    page: _Page
    fmt: bytes | None  # None: the template uses the per-request values in ways we cannot cache
    slots: tuple[int, ...]  # indexes into (request id, time, ISO time)


_CONTENT_TYPES: Final[Mapping[Media, str]] = {
    "html": "text/html; charset=utf-8",
    # RFC 9457 §6.1 defines no charset parameter: JSON is UTF-8, and ours is ASCII anyway.
    "json": "application/problem+json",
    "text": "text/plain; charset=utf-8",
}
_SLOT_NAMES = ("rid", "ts", "iso")
_TEMPLATE_NAME = "error.html"
_SAMPLE_DETAILS: Final[Mapping[str, Any]] = {
    "proxy_error": "connection_limit_reached",
    "received_status": 503,
    "upstream": "sample",
    "attempts": 1,
    "elapsed_ms": 1.0,
    "exception": "LoadShedError: sample",
}

_Key = tuple[bool, int, str | None, int | None, int | None, Media, str]


class ErrorRenderer:
    """Renders gateway errors as branded, content-negotiated responses. Build one per Guard.

    >>> renderer = ErrorRenderer(Settings(service="shop"))
    >>> from gateway_guard.errors import UpstreamTimeout
    >>> page = renderer.render(UpstreamTimeout("slow"), request_id="abc", accept="*/*")
    >>> page.status, dict(page.headers)["proxy-status"]
    (504, 'shop; error=http_response_timeout')

    ``template_problems`` lists what was wrong with the branding, each logged once here: a
    user template that fails to load or render (the built-in page is used instead), or a
    colour or URL that settings validation would have refused (replaced or left out).
    ``clock`` (``time.time`` by default) gives the time shown to visitors.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._service = settings.service
        self._debug = settings.debug
        self._clock = clock
        self._cache: dict[_Key, _Entry] = {}
        self._negotiated: dict[str, Media] = {}
        self._stamp: tuple[int, bytes, bytes, str, str] = (-1, b"", b"", "", "")
        self._last_failure_log = -math.inf
        self._failures_since_log = 0
        problems: list[str] = []
        brand = settings.brand
        self._static = self._static_context(brand, problems)
        self._template, builtin = self._load_template(brand.template_dir, problems)
        # The built-in page runs no script and loads nothing but the logo: say so to the
        # browser, so that even a missed escape could not run anything. A user's template
        # may load its own assets, so it gets no policy it did not ask for.
        self._csp = _content_security_policy(self._static["logo_url"]) if builtin else None
        self.template_problems: tuple[str, ...] = tuple(problems)
        # Random markers stand in for the per-request values while a body is rendered for the
        # cache; a second set of a different length shows whether a template used them as
        # opaque text (so that substituting them later is exact).
        prefix = "ggA" + secrets.token_hex(10)
        self._marks = _markers(prefix)
        self._marks_b = _markers("ggB" + secrets.token_hex(14))
        self._mark_re = re.compile(prefix.encode() + rb"(rid|ts|iso)")

    # --- public ---------------------------------------------------------------------------

    def render(
        self,
        error: UpstreamError,
        *,
        request_id: str,
        accept: str | bytes | None = None,
        method: str = "GET",
        timings: Sequence[tuple[str, float, str | None]] = (),
    ) -> RenderedError:
        """The response for ``error``. Never raises: on any failure, :meth:`fallback`.

        ``timings`` become a ``Server-Timing`` header in debug mode only.
        """
        status = 502
        try:
            status = _clamp_status(error.status)
            proxy_error: str | None = error.proxy_error
            known = proxy_error is None or proxy_error in PROXY_ERROR_TYPES
            if not known:
                # The Proxy-Status header says the same (headers.proxy_status does this).
                proxy_error = "proxy_internal_error"
            received = _received(error.received_status)
            retry = _retry_seconds(error.retry_after, status)
            media = self._negotiate(accept)
            # Only the page depends on the method (a "Try again" link, a caution).
            method_class = _method_class(method) if media == "html" else ""
            key: _Key = (False, status, proxy_error, received, retry, media, method_class)
            situation = _situation(status, proxy_error, known)
            if self._debug:
                debug_entry = self._debug_entry(error, key, situation, timings)
                return self._emit(debug_entry, request_id, method)
            entry = self._cache.get(key) or self._fill(key, situation)
            return self._emit(entry, request_id, method)
        except Exception:
            self._log_failure(status)
            return self.fallback(status, request_id, method=method)

    def render_status(
        self,
        status: int,
        *,
        request_id: str,
        accept: str | bytes | None = None,
        method: str = "GET",
        received_status: int | None = None,
        retry_after: float | None = None,
    ) -> RenderedError:
        """The branded response for a 502/503/504 that the app itself returned.

        There is no error type to report (``Proxy-Status`` names only the service, with
        ``received-status`` when given). Pass the app's own ``Retry-After`` (in seconds) as
        ``retry_after`` to keep it; a 503 without one gets the default. Never raises.
        """
        status = _clamp_status(status)
        try:
            received = _received(received_status)
            retry = _retry_seconds(retry_after, status)
            media = self._negotiate(accept)
            method_class = _method_class(method) if media == "html" else ""
            key: _Key = (True, status, None, received, retry, media, method_class)
            # Cached in debug mode too: there are no per-request details to show.
            entry = self._cache.get(key) or self._fill(key, _app_situation(status))
            return self._emit(entry, request_id, method)
        except Exception:
            self._log_failure(status)
            return self.fallback(status, request_id, method=method)

    def fallback(self, status: int, request_id: str, *, method: str = "GET") -> RenderedError:
        """A minimal plain-text response for ``status``, built without templates or caches.

        Used when rendering fails; it cannot fail itself (a last-resort constant stands
        behind it).
        """
        try:
            status = _clamp_status(status)
            rid = _clean_request_id(request_id)
            body = f"{status} {_PHRASES.get(status, 'Server Error')}\n\nReference: {rid}\n"
            data = body.encode("ascii")
            headers = [
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(data))),
                ("cache-control", "no-store"),
                ("vary", "Accept"),
                ("x-content-type-options", "nosniff"),
                ("x-request-id", rid),
                ("proxy-status", proxy_status(self._service)),
            ]
            if status == 503:
                headers.append(("retry-after", str(DEFAULT_503_RETRY_AFTER)))
            head = isinstance(method, str) and method.upper() == "HEAD"
            return RenderedError(status, headers, b"" if head else data)
        except Exception:
            return RenderedError(502, list(_LAST_RESORT_HEADERS), _LAST_RESORT_BODY)

    @property
    def cache_size(self) -> int:
        """How many rendered responses are cached (bounded; for tests and monitoring)."""
        return len(self._cache)

    # --- the hot path ---------------------------------------------------------------------

    def _negotiate(self, accept: str | bytes | None) -> Media:
        if not accept:
            return "text"
        if isinstance(accept, bytes):
            accept = accept.decode("latin-1")
        media = self._negotiated.get(accept)
        if media is None:
            media = negotiate(accept)
            if len(accept) <= _MAX_CACHED_ACCEPT_LENGTH:
                if len(self._negotiated) >= _NEGOTIATION_CACHE_SIZE:
                    self._negotiated.clear()
                self._negotiated[accept] = media
        return media

    def _emit(self, entry: _Entry, request_id: str, method: str) -> RenderedError:
        rid = _clean_request_id(request_id)
        if entry.fmt is not None:
            _, ts, iso, _, _ = self._now()
            if entry.media == "html":
                # Escaped although the alphabet of a clean id has nothing to escape: the
                # second line of defence costs less than a microsecond.
                rid_bytes = html.escape(rid).encode("ascii")
            elif entry.media == "json":
                rid_bytes = encode_basestring_ascii(rid)[1:-1].encode("ascii")
            else:
                rid_bytes = rid.encode("ascii")
            values = (rid_bytes, ts, iso)
            body = entry.fmt % tuple([values[i] for i in entry.slots])
        else:
            _, _, _, ts_text, iso_text = self._now()
            body = self._body(entry.page, entry.media, rid, ts_text, iso_text)
        headers = [*entry.headers, ("content-length", str(len(body))), ("x-request-id", rid)]
        # HEAD: the same headers, Content-Length included (RFC 9110 §8.6 allows it when it
        # is the GET body's length), and no body.
        head = isinstance(method, str) and method.upper() == "HEAD"
        return RenderedError(entry.status, headers, b"" if head else body)

    def _now(self) -> tuple[int, bytes, bytes, str, str]:
        # Formatting a time costs more than the rest of a cached render: once per second.
        second = int(self._clock())
        stamp = self._stamp
        if stamp[0] != second:
            moment = time.gmtime(second)
            text = time.strftime("%Y-%m-%d %H:%M:%S UTC", moment)
            iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", moment)
            stamp = (second, text.encode("ascii"), iso.encode("ascii"), text, iso)
            self._stamp = stamp
        return stamp

    # --- building entries -------------------------------------------------------------------

    def _fill(self, key: _Key, situation: str) -> _Entry:
        entry = self._build(key, situation)
        # Bounded: an outage with ever-changing Retry-After values (breaker countdowns) must
        # not grow memory. Clearing all is crude but cheap, and refilling costs one render
        # per distinct page. Concurrent threads at worst render an entry twice.
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = entry
        return entry

    def _page(
        self, key: _Key, situation: str, details: Mapping[str, Any] | None = None
    ) -> tuple[_Page, Media]:
        """The page a cache key describes, and the media to render it in."""
        app, status, proxy_error, received, retry, media, method_class = key
        if media == "html" and self._template is None:
            media = "text"  # the built-in template failed to load: plain text still informs
        page = _Page(
            status=status,
            situation=situation,
            proxy_error=proxy_error,
            received_status=received,
            retry_after=retry,
            retry_link=method_class == "reload",
            caution=method_class == "unsafe",
            app=app,
            details=details,
        )
        return page, media

    def _build(self, key: _Key, situation: str) -> _Entry:
        page, media = self._page(key, situation)
        headers = self._headers(page, media)
        rid, ts, iso = self._marks
        body = self._body(page, media, rid, ts, iso)
        slots: list[int] = []

        def slot(match: re.Match[bytes]) -> bytes:
            slots.append(_SLOT_NAMES.index(match[1].decode()))
            return b"%b"

        fmt: bytes | None = self._mark_re.sub(slot, body.replace(b"%", b"%%"))
        if media == "html":
            rid_b, ts_b, iso_b = self._marks_b
            expected = self._substitute(body, self._marks_b)
            if self._body(page, media, rid_b, ts_b, iso_b) != expected:
                fmt = None  # e.g. {{ request_id[:8] }} or |upper: render per request
        return _Entry(page.status, media, tuple(headers), page, fmt, tuple(slots))

    def _substitute(self, body: bytes, marks: tuple[str, str, str]) -> bytes:
        values = dict(zip((b"rid", b"ts", b"iso"), (m.encode() for m in marks), strict=True))
        return self._mark_re.sub(lambda m: values[m[1]], body)

    def _headers(
        self,
        page: _Page,
        media: Media,
        *,
        details: str | None = None,
        next_hop: str | None = None,
        timings: Sequence[tuple[str, float, str | None]] = (),
    ) -> list[tuple[str, str]]:
        # Every value is printable ASCII by construction: constants, integers, and
        # proxy_status/server_timing, which reduce any text they carry to printable ASCII.
        headers = [
            ("content-type", _CONTENT_TYPES[media]),
            ("cache-control", "no-store"),
            ("vary", "Accept"),
            ("x-content-type-options", "nosniff"),
            (
                "proxy-status",
                proxy_status(
                    self._service,
                    page.proxy_error,
                    received_status=page.received_status,
                    details=details,
                    next_hop=next_hop,
                ),
            ),
        ]
        if page.retry_after is not None:
            headers.append(("retry-after", str(page.retry_after)))
        if media == "html" and self._csp is not None:
            headers.append(("content-security-policy", self._csp))
        if timings:
            try:
                value = server_timing(timings)
            except Exception:  # odd timing data must not cost the debug page
                logger.debug("gateway_guard: unusable Server-Timing entries", exc_info=True)
                value = ""
            if value:
                headers.append(("server-timing", value))
        return headers

    def _body(self, page: _Page, media: Media, rid: str, ts: str, iso: str) -> bytes:
        if media == "html":
            return self._html(page, rid, ts, iso)
        if media == "json":
            return _problem_json(page, rid)
        return self._text(page, rid, ts)

    def _context(self, page: _Page, rid: str, ts: str, iso: str) -> dict[str, Any]:
        heading, message = _COPY[page.situation]
        return {
            **self._static,
            "status": page.status,
            "status_phrase": page.status_phrase,
            "situation": page.situation,
            "heading": heading,
            "message": message,
            "advice": page.advice,
            "caution": _CAUTION if page.caution else None,
            "retry_after": page.retry_after,
            "retry_after_text": (
                _duration_words(page.retry_after) if page.retry_after is not None else None
            ),
            "retry_link": page.retry_link,
            "proxy_error": page.proxy_error,
            "received_status": page.received_status,
            "request_id": rid,
            "timestamp": ts,
            "timestamp_iso": iso,
            "details": page.details,
        }

    def _html(self, page: _Page, rid: str, ts: str, iso: str) -> bytes:
        assert self._template is not None  # _build switches to text when it is None
        # Autoescape is on for every template (ours and the user's): all values, the
        # request id and the debug exception text included, are HTML-escaped by Jinja.
        text = self._template.render(self._context(page, rid, ts, iso))
        # "replace": a lone surrogate in an exception message must not fail the page.
        return text.encode("utf-8", "replace")

    def _text(self, page: _Page, rid: str, ts: str) -> bytes:
        _, message = _COPY[page.situation]
        name = self._static["brand_name"]
        status_line = f"{page.status} {page.status_phrase}"
        lines = [f"{_one_line(name)}: {status_line}" if name else status_line, ""]
        lines += [message, page.advice, ""]
        if self._static["status_url"]:
            lines.append(f"Status page: {self._static['status_url']}")
        if self._static["support_url"]:
            lines.append(f"Support: {self._static['support_url']}")
        lines.append(f"Reference: {rid} ({ts})")
        if page.details is not None:
            lines += ["", "Debug details (debug mode is on; turn it off in production):"]
            for label, field in (
                ("Proxy error", "proxy_error"),
                ("Received status", "received_status"),
                ("Upstream", "upstream"),
                ("Attempts", "attempts"),
                ("Elapsed ms", "elapsed_ms"),
            ):
                if page.details[field] is not None:
                    lines.append(f"{label}: {_one_line(str(page.details[field]))}")
            # Plain text has no escaping: controls become spaces, so no line can be forged;
            # the exception's own lines (its causes) are indented under it.
            first, *causes = page.details["exception"].split("\n")
            lines.append(f"Exception: {_one_line(first)}")
            lines.extend(f"  {_one_line(cause)}" for cause in causes)
        return ("\n".join(lines) + "\n").encode("utf-8", "replace")

    # --- debug ----------------------------------------------------------------------------

    def _debug_entry(
        self,
        error: UpstreamError,
        key: _Key,
        situation: str,
        timings: Sequence[tuple[str, float, str | None]],
    ) -> _Entry:
        """An uncached entry with the error's internals: its body is rendered per request."""
        # An error's key, from render(): its ``app`` is always False.
        _, _, proxy_error, received, *_ = key
        attempts, elapsed, upstream = error.attempts, error.elapsed, error.upstream
        details = {
            "proxy_error": proxy_error,
            "received_status": received,
            "upstream": _safe_str(upstream) if upstream is not None else None,
            "attempts": attempts if type(attempts) is int else None,
            "elapsed_ms": (
                round(elapsed * 1000, 1)
                if isinstance(elapsed, int | float) and math.isfinite(elapsed)
                else None
            ),
            "exception": _exception_text(error),
        }
        page, media = self._page(key, situation, details)
        headers = self._headers(
            page,
            media,
            details=_safe_str(error),
            next_hop=_safe_str(upstream) if upstream is not None else None,
            timings=timings,
        )
        return _Entry(page.status, media, tuple(headers), page, None, ())

    # --- set-up -----------------------------------------------------------------------------

    def _static_context(self, brand: BrandSettings, problems: list[str]) -> dict[str, Any]:
        accent = brand.accent_color
        if not _COLOUR_RE.fullmatch(accent):
            problems.append(f"brand.accent_color: not a hex colour, using #2563eb: {accent!r}")
            logger.warning("gateway_guard: %s", problems[-1])
            accent = "#2563eb"
        urls: dict[str, str | None] = {}
        for key in ("logo_url", "support_url", "status_url"):
            url = getattr(brand, key)
            if url is not None and not _SAFE_URL_RE.fullmatch(url):
                problems.append(f"brand.{key}: not an http(s) URL or /path, left out: {url!r}")
                logger.warning("gateway_guard: %s", problems[-1])
                url = None
            urls[key] = url or None
        return {
            "lang": brand.lang,
            "brand_name": brand.name,
            **urls,
            "accent_color": accent,
            "accent_ink": _ink(accent, PALETTE["light"]["card"], "#000000"),
            "accent_ink_dark": _ink(accent, PALETTE["dark"]["card"], "#ffffff"),
            "palette": PALETTE,
            "debug": self._debug,
        }

    def _load_template(
        self, template_dir: str | None, problems: list[str]
    ) -> tuple[jinja2.Template | None, bool]:
        """The error page template and whether it is the built-in one."""

        def report(problem: str) -> None:
            problems.append(problem)
            logger.error("gateway_guard: %s", problem)

        if template_dir is not None:
            user_file = Path(template_dir) / _TEMPLATE_NAME
            if not Path(template_dir).is_dir():
                report(f"brand.template_dir: not a directory: {template_dir!r}")
            elif not user_file.is_file():
                report(
                    f"brand.template_dir: no {_TEMPLATE_NAME} in {template_dir!r}; "
                    "using the built-in page"
                )
            else:
                try:
                    environment = _environment(jinja2.FileSystemLoader(template_dir))
                    template = environment.get_template(_TEMPLATE_NAME)
                    self._smoke_test(template)
                    return template, False
                except Exception as exc:
                    where = str(user_file)
                    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
                        where += f", line {exc.lineno}"
                    report(
                        f"brand.template_dir: {where}: {type(exc).__name__}: {exc}; "
                        "using the built-in page"
                    )
        try:
            return _environment(None).get_template(_TEMPLATE_NAME), True
        except Exception:  # a broken installation: answer in plain text rather than crash
            logger.exception("gateway_guard: the built-in error page cannot be loaded")
            problems.append("the built-in error page cannot be loaded; using plain text")
            return None, False

    def _smoke_test(self, template: jinja2.Template) -> None:
        # Render once at start-up with every optional part present, so a template that
        # fails on everything is reported (and replaced) now, not at the first outage.
        page = _Page(
            status=503,
            situation="overloaded",
            proxy_error="connection_limit_reached",
            received_status=503,
            retry_after=5,
            retry_link=True,
            caution=True,
            app=False,
            details=_SAMPLE_DETAILS,
        )
        context = self._context(page, "sample-request-id", "2000-01-01 00:00:00 UTC", "")
        template.render(context)

    def _log_failure(self, status: int) -> None:
        # During an outage a broken template fails thousands of times a second: one
        # traceback per interval, with a count of the others, keeps the log readable.
        now = time.monotonic()
        if now - self._last_failure_log < _FAILURE_LOG_INTERVAL:
            self._failures_since_log += 1
            return
        others, self._failures_since_log = self._failures_since_log, 0
        self._last_failure_log = now
        logger.exception(
            "gateway_guard: rendering a %d response failed; sent the plain-text fallback%s",
            status,
            f" ({others} more failures since the last report)" if others else "",
        )


def _environment(user_loader: jinja2.BaseLoader | None) -> jinja2.Environment:
    builtin = jinja2.PackageLoader("gateway_guard", "templates")
    # "gateway_guard/error.html" always names ours, so a user's error.html can extend it
    # (plain "error.html" would find the user's own file again).
    loaders: list[jinja2.BaseLoader] = [builtin, jinja2.PrefixLoader({"gateway_guard": builtin})]
    if user_loader is not None:
        loaders.insert(0, user_loader)  # the user's directory first, then ours
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        # Every template here is HTML: escape everything, whatever the file is called.
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # Templates are compiled once and kept: no stat() per render.
        auto_reload=False,
    )


def _content_security_policy(logo_url: str | None) -> str:
    if logo_url is None:
        images = "'none'"
    elif logo_url.startswith("/"):
        images = "'self'"
    else:
        parts = urlsplit(logo_url)
        scheme = parts.scheme.lower()
        # A host-source may not carry user info or odd characters; the scheme alone still
        # lets the logo load.
        images = (
            f"{scheme}://{parts.netloc}" if _CSP_HOST_RE.fullmatch(parts.netloc) else f"{scheme}:"
        )
    return (
        f"default-src 'none'; style-src 'unsafe-inline'; img-src {images}; "
        "base-uri 'none'; form-action 'none'"
    )


def _markers(prefix: str) -> tuple[str, str, str]:
    # Letters and digits only: unchanged by HTML escaping, JSON encoding and our plain-text
    # cleaning, so every body keeps them intact.
    return (prefix + "rid", prefix + "ts", prefix + "iso")


def _method_class(method: object) -> str:
    name = method.upper() if isinstance(method, str) else ""
    if name in _RELOADABLE_METHODS:
        return "reload"
    if name in _IDEMPOTENT_METHODS:
        return "idempotent"
    return "unsafe"


def _app_situation(status: int) -> str:
    return {503: "app_unavailable", 504: "app_timeout"}.get(status, "app_error")


def _problem_json(page: _Page, rid: str) -> bytes:
    _, message = _COPY[page.situation]
    problem: dict[str, Any] = {
        "type": page.problem_type,
        "title": page.status_phrase,
        "status": page.status,
        "detail": message,
        # A URI, as RFC 9457 §3.1.5 requires; request_id carries the bare id for clients.
        "instance": f"urn:request:{rid}",
        "request_id": rid,
    }
    if page.proxy_error is not None:
        problem["proxy_error"] = page.proxy_error
    if page.received_status is not None:
        problem["received_status"] = page.received_status
    if page.retry_after is not None:
        problem["retry_after"] = page.retry_after
    if page.details is not None:
        for field in ("upstream", "attempts", "elapsed_ms", "exception"):
            problem[field] = page.details[field]
    # ensure_ascii: valid in any charset. <, > and & as \u escapes: the body stays inert
    # even if something renders it as HTML (the same JSON value to every parser).
    text = json.dumps(problem, ensure_ascii=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("ascii")


_LAST_RESORT_BODY = b"502 Bad Gateway\n"
_LAST_RESORT_HEADERS = (
    ("content-type", "text/plain; charset=utf-8"),
    ("content-length", str(len(_LAST_RESORT_BODY))),
    ("cache-control", "no-store"),
)
