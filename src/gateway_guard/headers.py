"""Diagnostic response headers: Proxy-Status, Retry-After, request ids, trace context, timing.

Everything here is pure, stdlib-only and cheap: these run for every inbound request (ids,
trace context) or on every gateway error (Proxy-Status, Retry-After). Regexes and tables
are built at import.

Any text that reaches a header through this module (service names, error details,
descriptions) is reduced to printable ASCII first, so a hostile or merely unusual value can
neither inject a header (CR/LF) nor break a structured-field parser::

    >>> proxy_status("shop", "connection_refused", received_status=503, details='a "b"')
    'shop; error=connection_refused; received-status=503; details="a \\\\"b\\\\""'
"""

from __future__ import annotations

import calendar
import math
import os
import random
import re
import time
from collections.abc import Iterable, Mapping

__all__: list[str] = []

# --- printable ASCII -------------------------------------------------------------------------

# Each character outside 0x20-0x7E becomes exactly one replacement character, so a value's
# length never changes and truncating before or after sanitising gives the same result.
# Whitespace controls (TAB, CR, LF, VT, FF) read best as a space ("line one line two");
# anything else that cannot be shown becomes "?".
_CONTROL_TABLE: dict[int, str] = {
    code: " " if chr(code) in "\t\n\v\f\r" else "?" for code in (*range(0x20), 0x7F)
}


def _printable_ascii(value: str) -> str:
    if value.isascii():
        # For ASCII text isprintable() is exactly 0x20-0x7E: the common case costs one scan.
        return value if value.isprintable() else value.translate(_CONTROL_TABLE)
    # "replace" turns every non-ASCII code point, lone surrogates included, into one "?".
    return value.translate(_CONTROL_TABLE).encode("ascii", "replace").decode("ascii")


def header_safe(value: str, max_len: int = 256) -> str:
    """``value`` cut to ``max_len`` characters, reduced to printable ASCII, ends trimmed.

    For free-text headers: CR, LF and TAB become spaces, other control characters and every
    non-ASCII character become ``?``. Quotes and backslashes are kept as they are (this is
    not a quoted string; use :func:`sf_string` for that).
    """
    return _printable_ascii(value[: max(max_len, 0)]).strip(" ")


# --- RFC 8941 structured fields --------------------------------------------------------------

_SF_TOKEN_RE = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_SF_KEY_RE = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_INTEGER_MAX = 999_999_999_999_999
_MAX_TEXT = 256


def sf_token(value: str) -> str | None:
    """``value`` if it is a valid sf-token (RFC 8941 §3.3.4), else None."""
    return value if _SF_TOKEN_RE.fullmatch(value) else None


def sf_string(value: str, max_len: int = _MAX_TEXT) -> str:
    """Serialise any text as an sf-string (RFC 8941 §3.3.3), quotes included.

    The text is first cut to ``max_len`` characters (so an escape is never split), then
    every character outside printable ASCII is replaced as :func:`header_safe` does (TAB,
    CR, LF and the other line breaks by a space; other controls and non-ASCII by ``?``);
    ``"`` and ``\\`` are escaped. The result parses back to exactly that replaced text.

    >>> sf_string('say "hi"\\r\\n')
    '"say \\\\"hi\\\\"  "'
    """
    text = _printable_ascii(value[: max(max_len, 0)])
    if '"' in text or "\\" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# RFC 9209 §2.3 (the IANA "HTTP Proxy Error Types" registry as the RFC created it). The
# registry can grow by expert review: add new names here when we start emitting them.
PROXY_ERROR_TYPES: frozenset[str] = frozenset(
    {
        "dns_timeout",
        "dns_error",
        "destination_not_found",
        "destination_unavailable",
        "destination_ip_prohibited",
        "destination_ip_unroutable",
        "connection_refused",
        "connection_terminated",
        "connection_timeout",
        "connection_read_timeout",
        "connection_write_timeout",
        "connection_limit_reached",
        "tls_protocol_error",
        "tls_certificate_error",
        "tls_alert_received",
        "http_request_error",
        "http_request_denied",
        "http_response_incomplete",
        "http_response_header_section_size",
        "http_response_header_size",
        "http_response_body_size",
        "http_response_trailer_section_size",
        "http_response_trailer_size",
        "http_response_transfer_coding",
        "http_response_content_coding",
        "http_response_timeout",
        "http_upgrade_failed",
        "http_protocol_error",
        "proxy_internal_response",
        "proxy_internal_error",
        "proxy_configuration_error",
        "proxy_loop_detected",
    }
)
# An extra parameter under one of these names would silently override ours: RFC 8941
# parsers keep the last value of a repeated parameter.
_RESERVED_PARAMS = frozenset({"error", "received-status", "next-hop", "details"})


def proxy_status(
    service: str,
    error: str | None = None,
    *,
    received_status: int | None = None,
    details: str | None = None,
    next_hop: str | None = None,
    extra: Mapping[str, str | int | bool] | None = None,
) -> str:
    """One ``Proxy-Status`` list member (RFC 9209) naming ``service``.

    ``service`` is emitted as an sf-token when it is one, else as an sf-string (cut to 256
    characters either way). ``error`` must be an RFC 9209 error type
    (:data:`PROXY_ERROR_TYPES`); anything else becomes ``proxy_internal_error`` rather
    than an invalid field. ``received_status`` is emitted only when it is 0-999;
    ``next_hop`` and ``details`` are sf-strings as :func:`sf_string` makes them. ``extra``
    parameters follow in their given order; those whose name is not an sf-key or is one of
    the four above, and integers outside the sf-integer range, are left out.

    >>> proxy_status("shop", "http_response_timeout", next_hop="payments")
    'shop; error=http_response_timeout; next-hop="payments"'
    """
    service = service[:_MAX_TEXT]
    parts = [service if _SF_TOKEN_RE.fullmatch(service) else sf_string(service)]
    if error is not None:
        parts.append(f"error={error if error in PROXY_ERROR_TYPES else 'proxy_internal_error'}")
    # bool is an int: True would otherwise be emitted as received-status=1.
    if (
        received_status is not None
        and type(received_status) is not bool
        and 0 <= received_status <= 999
    ):
        parts.append(f"received-status={int(received_status)}")
    if next_hop is not None:
        parts.append(f"next-hop={sf_string(next_hop)}")
    if details is not None:
        parts.append(f"details={sf_string(details)}")
    if extra:
        for key, value in extra.items():
            if key in _RESERVED_PARAMS or not _SF_KEY_RE.fullmatch(key):
                continue
            if isinstance(value, bool):
                # RFC 8941 §4.1.1.2: a true parameter is written as its bare name.
                parts.append(key if value else f"{key}=?0")
            elif isinstance(value, int):
                if -_SF_INTEGER_MAX <= value <= _SF_INTEGER_MAX:
                    parts.append(f"{key}={int(value)}")
            else:
                parts.append(f"{key}={sf_string(value)}")
    return "; ".join(parts)


# --- Retry-After -----------------------------------------------------------------------------

_DELAY_SECONDS_RE = re.compile(r"[0-9]+")
# A value this far out means "not in any useful time": keeping results finite spares every
# caller from inf arithmetic (sleep(inf) raises) while comparing as "too long" everywhere.
_MAX_DELAY = 1e9
# The longest HTTP-date (rfc850 with "Wednesday") is 33 characters; the margin is for the
# variants email.utils tolerates. Longer input is not a date and is refused before parsing.
_MAX_DATE_LENGTH = 64
# The rfc850 form "Sunday, 06-Nov-94": day and month come before a two-digit year. In
# asctime the day follows the month, so it cannot be mistaken for a year here.
_TWO_DIGIT_YEAR_RE = re.compile(r"(?<!\d)\d{1,2}[- ][A-Za-z]{3}[- ](\d{2})(?!\d)")
_LEAP_SECOND_RE = re.compile(r"(\d\d:\d\d):60(?!\d)")


def format_retry_after(seconds: float, *, max_seconds: int = 86400) -> str:
    """A ``Retry-After`` delay-seconds value for a wait of ``seconds``.

    Rounded up, so a client never comes back before we would admit it: any positive wait is
    at least ``"1"``, zero or less is ``"0"``, and the value is capped at ``max_seconds``
    (also for +inf). NaN, an unknown wait, gives ``"1"``: a short pause rather than an
    invitation to retry at once.
    """
    if seconds > 0:
        if seconds >= max_seconds:
            return str(max_seconds)
        return str(math.ceil(seconds))
    if seconds <= 0:
        return "0"
    return "1"


_DAYS = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_LONG_DAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.lower(): number for number, name in enumerate(_MONTHS, start=1)}
_MONTH = "|".join(_MONTHS)
_TIME = r"(?P<hour>\d\d):(?P<minute>\d\d):(?P<second>\d\d)"
# The three HTTP-date forms of RFC 9110 §5.6.7. Recipients must accept all three; names
# are matched without regard to case because being stricter than senders helps no one.
_IMF_FIXDATE = re.compile(
    rf"(?:{_DAYS}), (?P<day>\d\d) (?P<month>{_MONTH}) (?P<year>\d{{4}}) {_TIME} GMT",
    re.ASCII | re.IGNORECASE,
)
_RFC850_DATE = re.compile(
    rf"(?:{_LONG_DAYS}), (?P<day>\d\d)-(?P<month>{_MONTH})-(?P<year>\d\d) {_TIME} GMT",
    re.ASCII | re.IGNORECASE,
)
_ASCTIME_DATE = re.compile(
    rf"(?:{_DAYS}) (?P<month>{_MONTH}) (?P<day>[ \d]\d) {_TIME} (?P<year>\d{{4}})",
    re.ASCII | re.IGNORECASE,
)
# The longest valid value is an rfc850-date with "Wednesday" (33 characters). Anything
# much longer is not a date, and refusing it early bounds the work a hostile upstream
# can cause.
_MAX_RETRY_AFTER_LENGTH = 40
# 18 digits fit a float without surprises and stay far below Python's int-parsing limit.
_MAX_DELAY_DIGITS = 18


def parse_retry_after(value: str, *, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value (RFC 9110 §10.2.3).

    Accepts delay-seconds (``"120"``) and an HTTP-date in any of its three forms, which is
    turned into seconds from ``now`` (a ``time.time()`` timestamp, by default the current
    time); a date in the past gives 0, and nothing is above 1e9 s (absurd delays are
    clamped). Dates are matched strictly (GMT only, exact layout): an upstream's text is
    hostile until proven otherwise. Returns None for anything else (negative or fractional
    numbers, malformed or overlong values) and never raises.

    Several ``Retry-After`` fields arrive joined into one comma-separated list (httpx
    joins repeated headers with ``", "``): the largest valid element wins and invalid
    ones are ignored, so ``"2, 2"`` is 2 s and ``"soon, 3"`` is 3 s. Only the first
    :data:`_MAX_RETRY_AFTER_ELEMENTS` elements are looked at.
    """
    seconds = _parse_retry_after_value(value, now)
    if seconds is None and "," in value:
        return _parse_retry_after_list(value, now)
    return seconds


# A real upstream repeats the header a few times at most; a list longer than this is
# hostile, and only its first elements are parsed (each one bounded by the checks above).
_MAX_RETRY_AFTER_ELEMENTS = 8


def _parse_retry_after_list(value: str, now: float | None) -> float | None:
    """The largest valid element of a joined list; None when no element is valid.

    An IMF-fixdate or rfc850-date holds a comma of its own ("Sun, 06 Nov ..."), so an
    element that is not valid alone is tried again joined with the next one. The split
    is bounded (``maxsplit``), so the work is linear in the header's length whatever it
    holds; the unsplit rest becomes one last element, which is refused as overlong.
    """
    parts = value.split(",", _MAX_RETRY_AFTER_ELEMENTS)
    if now is None:
        now = time.time()  # once, so that every date in the list is judged at one instant
    best: float | None = None
    index = 0
    while index < len(parts):
        seconds = _parse_retry_after_value(parts[index], now)
        step = 1
        if seconds is None and index + 1 < len(parts):
            seconds = _parse_retry_after_value(f"{parts[index]},{parts[index + 1]}", now)
            step = 2 if seconds is not None else 1
        if seconds is not None and (best is None or seconds > best):
            best = seconds
        index += step
    return best


def _parse_retry_after_value(value: str, now: float | None) -> float | None:
    """One ``Retry-After`` value (see :func:`parse_retry_after`)."""
    text = value.strip(" \t")
    if text.isascii() and text.isdigit():
        # An absurdly long delay is clamped, not ignored: ignoring it would retry at once,
        # against the upstream's wish; clamped, it exceeds max_retry_after and fails fast.
        digits = text.lstrip("0")
        if len(digits) > _MAX_DELAY_DIGITS:
            return _MAX_DELAY
        return min(float(digits or "0"), _MAX_DELAY)
    if not text or len(text) > _MAX_RETRY_AFTER_LENGTH:
        return None
    if now is None:
        now = time.time()
    timestamp = _parse_http_date(text, now)
    if timestamp is None:
        return None
    delay = timestamp - now
    # Written so that a NaN ``now`` gives 0 rather than NaN.
    return min(delay, _MAX_DELAY) if delay > 0 else 0.0


def _parse_http_date(text: str, now: float) -> float | None:
    match = (
        _IMF_FIXDATE.fullmatch(text)
        or _RFC850_DATE.fullmatch(text)
        or _ASCTIME_DATE.fullmatch(text)
    )
    if match is None:
        return None
    year = int(match["year"])
    if len(match["year"]) == 2:
        # RFC 9110: a two-digit year more than 50 years in the future means the most
        # recent past year with those last two digits.
        this_year = _year_of(now)
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    month = _MONTH_NUMBER[match["month"].lower()]
    day, hour, minute = int(match["day"]), int(match["hour"]), int(match["minute"])
    if not (1 <= day <= calendar.monthrange(year, month)[1] and hour < 24 and minute < 60):
        return None
    # HTTP-dates allow a leap second (:60); POSIX timestamps have no room for it.
    second = min(int(match["second"]), 59)
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def _year_of(timestamp: float) -> int:
    try:
        return time.gmtime(timestamp).tm_year
    except (OverflowError, OSError, ValueError):  # NaN, inf or beyond the platform's range
        return time.gmtime().tm_year


# --- request ids and trace context -----------------------------------------------------------

# A private generator, not the random module's shared one, for trace and span ids: an
# application that calls random.seed(...) (tests, simulations) must not make our ids repeat
# across processes or restarts. Mersenne Twister seeded from os.urandom gives 128
# well-mixed bits without a system call; getrandbits() is one C call, so threads cannot
# interleave inside an id.
_rng = random.Random()
_randbits = _rng.getrandbits
_urandom = os.urandom
# Request ids come from the kernel's generator, 64 at a time (one getrandom() call per 64
# ids, handed out with list.pop()): cheaper per id than Mersenne Twister's bits turned into
# bytes, -783 instructions a request (bench/middleware.py's child under valgrind, ASLR off,
# PYTHONHASHSEED=0, 2026-12-08), and unpredictable besides. list.pop() is atomic, so two
# threads never get one id; two threads refilling at once each add fresh ids.
_ID_BATCH = 64
_ids: list[str] = []


def _after_fork_in_child() -> None:
    # A forked child inherits the unused ids and the generator's state; without this,
    # parent and child (and every worker of a pre-forking server) would hand out the same.
    _ids.clear()
    _rng.seed()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_REQUEST_ID_BYTES_RE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex characters (128 random bits).

    Collisions are a birthday problem over 2**128: after a trillion ids the chance of any
    repeat is about 1e-15. Ids are unique across forked workers (a child drops the ids it
    inherited unused) but are not secret; never use one as a credential.
    """
    try:
        return _ids.pop()
    except IndexError:
        # One C call each: 64 ids of 32 hex digits, split apart by hex()'s separator.
        batch = _urandom(16 * _ID_BATCH).hex(" ", 16).split()
        request_id = batch.pop()  # ours: other threads may empty _ids before we pop it
        _ids.extend(batch)
        return request_id


def valid_request_id(value: str | bytes | None) -> str | None:
    """An inbound ``X-Request-ID`` worth echoing, or None.

    Accepted: 1-128 characters of ``A-Z a-z 0-9 . _ : @ / + = -`` and nothing else (no
    spaces, quotes, controls or non-ASCII). ``bytes`` (raw ASGI header values) are checked
    as they are and returned decoded.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii") if _REQUEST_ID_BYTES_RE.fullmatch(value) else None
    return value if _REQUEST_ID_RE.fullmatch(value) else None


# W3C Trace Context §3.2: version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex.
# match() rather than fullmatch(): future versions may append "-"-separated fields.
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_LENGTH = 55
_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_FLAGS_RE = re.compile(r"[0-9a-f]{2}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` from a W3C ``traceparent`` header, or None.

    Version 00 must be exactly 55 characters. A higher version is read by its first 55
    characters, which must be followed by the end of the value or a ``-``; version ``ff``
    is invalid. Hex must be lowercase; an all-zero trace-id or parent-id is invalid.
    Surrounding spaces and tabs are ignored.

    >>> parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    ('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', '01')
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip(" \t")
    match = _TRACEPARENT_RE.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if len(value) != _TRACEPARENT_LENGTH and (version == "00" or value[_TRACEPARENT_LENGTH] != "-"):
        return None
    if version == "ff" or trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return trace_id, parent_id, flags


def new_traceparent(trace_id: str | None = None, flags: str = "01") -> str:
    """A version-00 ``traceparent`` with a new parent-id (span id).

    Continues ``trace_id`` when given (32 lowercase hex, not all zeros), else starts a new
    trace. ``flags`` is two lowercase hex digits (``"01"``: sampled). Invalid arguments
    raise ValueError: they come from our own code, never straight from a request.
    """
    if trace_id is None:
        # All-zero ids are invalid; the "or 1" costs nothing and makes them impossible.
        trace_id = (_randbits(128) or 1).to_bytes(16).hex()
    elif trace_id == _ZERO_TRACE_ID or not _TRACE_ID_RE.fullmatch(trace_id):
        raise ValueError(f"trace_id must be 32 lowercase hex digits, not all 0: {trace_id!r}")
    if flags != "01" and not _FLAGS_RE.fullmatch(flags):
        raise ValueError(f"flags must be 2 lowercase hex digits: {flags!r}")
    return f"00-{trace_id}-{(_randbits(64) or 1).to_bytes(8).hex()}-{flags}"


# --- Server-Timing ---------------------------------------------------------------------------

# RFC 9110 token: the metric name grammar of W3C Server Timing.
_NOT_TCHAR_RE = re.compile(r"[^A-Za-z0-9!#$%&'*+\-.^_`|~]")
_MAX_METRIC_NAME = 64
# 12 integer digits and 3 decimals: also a valid sf-decimal, should Server-Timing ever be
# parsed as a structured field.
_MAX_DURATION_MS = 999_999_999_999.999


def server_timing(entries: Iterable[tuple[str, float, str | None]]) -> str:
    """A ``Server-Timing`` value from ``(name, seconds, description)`` entries.

    Durations are given in seconds (as ``time.perf_counter()`` differences) and emitted as
    ``dur`` in milliseconds with at most 3 decimals; a negative duration is 0, a NaN or
    infinite one is left out. Names become tokens (other characters are replaced by ``_``,
    cut to 64; an empty name is ``unnamed``); descriptions are quoted strings made by
    :func:`sf_string`. No entries give ``""``: emit no header then.

    >>> server_timing([("payments", 0.0123, "2 attempts"), ("app", 0.05, None)])
    'payments;dur=12.3;desc="2 attempts", app;dur=50'
    """
    metrics = []
    for name, seconds, desc in entries:
        metric = _NOT_TCHAR_RE.sub("_", name[:_MAX_METRIC_NAME]) or "unnamed"
        if math.isfinite(seconds):
            # Not max(): it would keep -0.0, which formats as "-0".
            ms = min(seconds * 1000.0, _MAX_DURATION_MS) if seconds > 0 else 0.0
            metric += ";dur=" + f"{ms:.3f}".rstrip("0").rstrip(".")
        if desc is not None:
            metric += ";desc=" + sf_string(desc)
        metrics.append(metric)
    return ", ".join(metrics)
