"""Input hygiene: what the renderer does to values it did not make before they reach a body.

Request ids are forced into the alphabet the middleware generates, statuses into the
ranges that make sense, and text into one line (plain text has no escaping); a hostile
``__str__`` costs a placeholder, not the page. Brand colours and URLs are checked again
here because a :class:`~gateway_guard.settings.Settings` built directly skips
:func:`~gateway_guard.settings.check_settings`.
"""

from __future__ import annotations

import re
from typing import Final

from .headers import format_retry_after

__all__ = [
    "COLOUR_RE",
    "DEFAULT_503_RETRY_AFTER",
    "SAFE_URL_RE",
    "clamp_status",
    "clean_received",
    "clean_request_id",
    "exception_text",
    "one_line",
    "retry_seconds",
    "safe_str",
]

# A 503 tells the client to come back later; without a number, well-behaved clients guess
# (often "at once"). Five seconds lets a shed burst drain without making visitors wait long.
DEFAULT_503_RETRY_AFTER: Final = 5

_MAX_EXCEPTION_TEXT = 2000
_CAUSE_LIMIT = 5

# The request ids headers.valid_request_id accepts. The middleware sends only those; anything
# else (a bug, a direct caller) is forced into the same alphabet, so the id is the same
# string in the header and in every body and needs no escaping anywhere. It is escaped for
# each body anyway, as a second line of defence.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_NOT_REQUEST_ID_CHAR_RE = re.compile(r"[^A-Za-z0-9._:@/+=-]")
COLOUR_RE = re.compile(r"#(?:[0-9a-fA-F]{3}){1,2}")
# settings.check_settings refuses other URLs, but a Settings built directly skips those
# checks; an href must never be javascript: or similar, so they are checked again here.
_URL_BAD = r"\x00-\x20\x7f\"'<>\\`"
SAFE_URL_RE = re.compile(
    rf"https?://[^/{_URL_BAD}][^{_URL_BAD}]*|/(?:[^/{_URL_BAD}][^{_URL_BAD}]*)?", re.IGNORECASE
)
# Line breaks and other controls (C0, DEL, C1, Unicode line/paragraph separators) would let
# text forge extra lines in a plain-text body.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean_request_id(value: object) -> str:
    """``value`` if it is a valid request id, else forced into that alphabet (``-``: none)."""
    if isinstance(value, str):
        if _REQUEST_ID_RE.fullmatch(value):
            return value
        return _NOT_REQUEST_ID_CHAR_RE.sub("_", value[:128]) or "-"
    return "-"


def clamp_status(value: object) -> int:
    # Only server errors are rendered as gateway errors; anything else is a caller's bug,
    # and 502 is the honest answer to "an upstream call failed somehow".
    return value if type(value) is int and 500 <= value <= 599 else 502


def clean_received(value: object) -> int | None:
    """An upstream's status worth reporting (100-999), else None."""
    return value if type(value) is int and 100 <= value <= 999 else None


def retry_seconds(value: object, status: int) -> int | None:
    """Whole seconds for ``Retry-After``, at least 1; a 503 without a number gets the default."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        # At least 1: "Retry-After: 0" invites a retry storm against an upstream in trouble.
        return max(1, int(format_retry_after(value)))
    return DEFAULT_503_RETRY_AFTER if status == 503 else None


def one_line(text: str) -> str:
    """``text`` with every control character made a space, so it cannot forge a line."""
    return _CONTROL_RE.sub(" ", text)


def safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a hostile __str__ must not cost the debug page
        return f"<unprintable {type(value).__name__}>"


def exception_text(error: BaseException) -> str:
    """``error`` and its first causes, one per line, cut to a bounded length (debug pages)."""
    lines = [f"{type(error).__name__}: {safe_str(error)}"]
    seen = {id(error)}
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen and len(lines) <= _CAUSE_LIMIT:
        seen.add(id(cause))
        lines.append(f"caused by {type(cause).__name__}: {safe_str(cause)}")
        cause = cause.__cause__ or cause.__context__
    return "\n".join(lines)[:_MAX_EXCEPTION_TEXT]
