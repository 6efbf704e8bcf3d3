"""Content negotiation: which body (HTML, problem+json or plain text) a request asks for.

:func:`negotiate` parses an ``Accept`` header in bounded time, helped by what the browser
says about the request itself (``Sec-Fetch-Dest``/``-Mode``, ``X-Requested-With``: a
script's ``fetch()`` sends ``Accept: */*`` and wants JSON; a navigation wants a page).
:func:`negotiate_cached` remembers the answer for the few real header combinations
(browsers send the same ones on every request), so the renderer's hot path costs a dict
lookup. :class:`Wants` carries the request headers negotiation reads, gathered by the
adapters only when an error page is rendered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Kind", "Media", "Wants", "kind_of", "negotiate", "negotiate_cached"]

Media = Literal["html", "json", "text"]
#: What the browser says the request is: a script's (``"program"``), a navigation to a page
#: (``"navigate"``), or nothing said (``""``: curl, HTTP libraries, old browsers).
Kind = Literal["program", "navigate", ""]

# Sec-Fetch-Dest values of a page the visitor navigates to (in a tab or a frame).
_NAVIGATION_DESTS = frozenset({"document", "iframe", "frame", "embed", "object"})
# Header values are short; a longer one is not a real browser's and is not looked at.
_MAX_HINT_LENGTH = 64


def kind_of(dest: str | None, mode: str | None, requested_with: str | None) -> Kind:
    """What kind of request the ``Sec-Fetch-Dest``/``-Mode`` and ``X-Requested-With`` say.

    ``Sec-Fetch-Dest: empty`` is every ``fetch()`` and ``XMLHttpRequest`` of a current
    browser; ``Sec-Fetch-Mode: cors`` a cross-origin one; ``X-Requested-With:
    XMLHttpRequest`` what jQuery and many frameworks add. ``Sec-Fetch-Mode: navigate`` (or
    a document destination) is a visitor opening a page.
    """
    if requested_with is not None and requested_with.strip().lower() == "xmlhttprequest":
        return "program"
    dest = dest.strip().lower() if dest is not None and len(dest) <= _MAX_HINT_LENGTH else ""
    mode = mode.strip().lower() if mode is not None and len(mode) <= _MAX_HINT_LENGTH else ""
    if dest == "empty" or mode == "cors":
        return "program"
    if mode == "navigate" or dest in _NAVIGATION_DESTS:
        return "navigate"
    return ""


@dataclass(frozen=True, slots=True)
class Wants:
    """The request headers an error response is negotiated by.

    ``accept`` and ``language`` are the ``Accept`` and ``Accept-Language`` fields (repeated
    field lines joined with ``", "``, RFC 9110 §5.3); ``kind`` is :func:`kind_of` the
    fetch metadata.
    """

    accept: str | None = None
    language: str | None = None
    kind: Kind = ""

    @classmethod
    def from_asgi(cls, headers: Iterable[tuple[bytes, bytes]]) -> Wants:
        """From an ASGI scope's ``headers`` (lower-case names, latin-1 values)."""
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            if name in _ASGI_NAMES:
                found.setdefault(name, []).append(value)

        def field(name: bytes) -> str | None:
            values = found.get(name)
            return b", ".join(values).decode("latin-1") if values else None

        return cls(
            field(b"accept"),
            field(b"accept-language"),
            kind_of(field(b"sec-fetch-dest"), field(b"sec-fetch-mode"), field(b"x-requested-with")),
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Wants:
        """From a WSGI environ (or Django's ``request.META``)."""

        def field(key: str) -> str | None:
            value = environ.get(key)
            return value if isinstance(value, str) else None

        return cls(
            field("HTTP_ACCEPT"),
            field("HTTP_ACCEPT_LANGUAGE"),
            kind_of(
                field("HTTP_SEC_FETCH_DEST"),
                field("HTTP_SEC_FETCH_MODE"),
                field("HTTP_X_REQUESTED_WITH"),
            ),
        )


_ASGI_NAMES = frozenset(
    {b"accept", b"accept-language", b"sec-fetch-dest", b"sec-fetch-mode", b"x-requested-with"}
)

_NEGOTIATION_CACHE_SIZE = 256
# Real Accept headers are under 300 characters; only a hostile one is longer. Parsing stops
# here, and at this many media ranges, so a huge header costs a bounded amount of work.
_MAX_ACCEPT_LENGTH = 2048
_MAX_MEDIA_RANGES = 64
# Only short values are remembered: hostile ones would evict the browsers' few real strings.
_MAX_CACHED_ACCEPT_LENGTH = 512

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


def _better(current: float | None, q: float) -> float:
    # A range listed twice counts with its better weight: lenient, and order-independent.
    return q if current is None or q > current else current


def negotiate(accept: str | bytes | None, kind: Kind = "") -> Media:
    """Which body to send for an ``Accept`` header: ``"html"``, ``"json"`` or ``"text"``.

    Each kind gets the weight (q) of the most specific media range that matches it
    (RFC 9110 §12.5.1):

    - ``"json"`` (application/problem+json): ``application/problem+json``, else the better
      of ``application/json`` and any ``application/…+json`` (``vnd.api+json``,
      ``hal+json``, ``*+json``), else ``application/*``; for a script's request
      (``kind="program"``), else ``*/*``.
    - ``"html"``: ``text/html``; for a navigation (``kind="navigate"``), else ``*/*``.
      Otherwise wildcards never select HTML: a client that wants a page for people says
      so, while ``*/*`` alone comes from curl and HTTP libraries.
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
        return "json" if kind == "program" else "html" if kind == "navigate" else "text"
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    html_q = problem_q = json_q = app_q = plain_q = text_q = any_q = None
    for item in accept[:_MAX_ACCEPT_LENGTH].split(",", _MAX_MEDIA_RANGES)[:_MAX_MEDIA_RANGES]:
        media_range, *params = item.split(";")
        top, slash, sub = media_range.strip(" \t").lower().partition("/")
        if not slash or not _TOKEN_RE.fullmatch(top) or not _TOKEN_RE.fullmatch(sub):
            continue
        if top == "*" and sub != "*":
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
        if top == "text":
            if sub == "html":
                html_q = _better(html_q, q)
            elif sub == "plain":
                plain_q = _better(plain_q, q)
            elif sub == "*":
                text_q = _better(text_q, q)
        elif top == "application":
            if sub == "problem+json":
                problem_q = _better(problem_q, q)
            elif sub == "json" or sub.endswith("+json"):
                json_q = _better(json_q, q)
            elif sub == "*":
                app_q = _better(app_q, q)
        elif top == "*":
            any_q = _better(any_q, q)
    # A weight from */* alone loses a tie to one from a range that names the type: a script
    # that lists "text/plain, */*" asked for text, one that says only "*/*" gets JSON.
    weights: tuple[tuple[tuple[float, bool], Media], ...] = (
        (_first(problem_q, json_q, app_q, wildcard=any_q if kind == "program" else None), "json"),
        (_first(html_q, wildcard=any_q if kind == "navigate" else None), "html"),
        (_first(plain_q, text_q, wildcard=any_q), "text"),
    )
    (best_q, _), best = max(weights, key=lambda pair: pair[0])  # max() keeps the first of equals
    return best if best_q > 0 else "text"


def _first(*weights: float | None, wildcard: float | None) -> tuple[float, bool]:
    """The most specific range's weight (the first listed, else ``wildcard``, else 0: not
    acceptable), and whether a range more specific than ``*/*`` gave it."""
    for q in weights:
        if q is not None:
            return q, True
    return (wildcard, False) if wildcard is not None else (0.0, False)


def negotiate_cached(
    accept: str | bytes | None, cache: dict[tuple[Kind, str], Media], kind: Kind = ""
) -> Media:
    """:func:`negotiate`, remembering short ``Accept`` values in ``cache`` (bounded)."""
    if not accept:
        return negotiate(None, kind)
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    key = (kind, accept)
    media = cache.get(key)
    if media is None:
        media = negotiate(accept, kind)
        if len(accept) <= _MAX_CACHED_ACCEPT_LENGTH:
            if len(cache) >= _NEGOTIATION_CACHE_SIZE:
                cache.clear()
            cache[key] = media
    return media
