"""Content negotiation: which body (HTML, problem+json or plain text) an ``Accept`` asks for.

:func:`negotiate` parses a header in bounded time; :func:`negotiate_cached` remembers the
answer for the few real ``Accept`` strings (browsers send the same one on every request),
so the renderer's hot path costs a dict lookup.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["Media", "negotiate", "negotiate_cached"]

Media = Literal["html", "json", "text"]

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


def negotiate_cached(accept: str | bytes | None, cache: dict[str, Media]) -> Media:
    """:func:`negotiate`, remembering short ``Accept`` values in ``cache`` (bounded)."""
    if not accept:
        return "text"
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    media = cache.get(accept)
    if media is None:
        media = negotiate(accept)
        if len(accept) <= _MAX_CACHED_ACCEPT_LENGTH:
            if len(cache) >= _NEGOTIATION_CACHE_SIZE:
                cache.clear()
            cache[accept] = media
    return media
