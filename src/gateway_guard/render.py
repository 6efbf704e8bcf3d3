"""Gateway error responses: the renderer that turns an error into a complete response.

:class:`ErrorRenderer` turns an :class:`~gateway_guard.errors.UpstreamError` into a complete
response (:class:`RenderedError`: status, headers, body) and never raises: whatever goes
wrong while rendering, it logs and answers with :meth:`ErrorRenderer.fallback`, so a bug in
our diagnostics (or in a user's template) can never turn a 502 into a 500.

During an outage the same few pages are sent thousands of times a second, so every body is
rendered once per distinct situation (status, error type, received status, Retry-After,
media type, kind of method) and kept as a ``bytes`` %-format (:mod:`._body_cache`); a
request then costs one dict lookup and one ``%``. Debug mode renders every response afresh
(it shows per-request details).

The parts, one concern each: :mod:`._negotiate` (which body an ``Accept`` asks for),
:mod:`._copy` (the words), :mod:`._hygiene` (cleaning what we did not make),
:mod:`._colours` (palette and contrast), :mod:`._templates` (the HTML page and its CSP),
:mod:`._bodies` (problem+json and plain text), :mod:`._body_cache`.

Nothing here imports a web framework: the middlewares send the result as it is.
"""

from __future__ import annotations

import html
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Final

# `import X as X`: re-exported for code written before this module was split; not API
# (docs/api.md lists what is), so not in __all__.
from ._bodies import PROBLEM_TYPE_BASE as PROBLEM_TYPE_BASE
from ._bodies import plain_text, problem_json
from ._body_cache import Entry, Markers, remember
from ._colours import PALETTE as PALETTE
from ._colours import contrast_ratio as contrast_ratio
from ._copy import PHRASES, Page, Words, app_situation, classify_method, situation_of
from ._hygiene import (
    DEFAULT_503_RETRY_AFTER,
    clamp_status,
    clean_received,
    clean_request_id,
    exception_text,
    retry_seconds,
    safe_str,
)
from ._languages import Languages
from ._negotiate import Kind, Media, Wants, negotiate_cached
from ._negotiate import negotiate as negotiate
from ._schema import Settings
from ._templates import content_security_policy, load_template, page_context, static_context
from .errors import UpstreamError
from .headers import PROXY_ERROR_TYPES, proxy_status, server_timing

__all__: list[str] = []

logger = logging.getLogger("gateway_guard")

_FAILURE_LOG_INTERVAL = 10.0


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


_CONTENT_TYPES: Final[Mapping[Media, str]] = {
    "html": "text/html; charset=utf-8",
    # RFC 9457 §6.1 defines no charset parameter: JSON is UTF-8, and ours is ASCII anyway.
    "json": "application/problem+json",
    "text": "text/plain; charset=utf-8",
}

_Key = tuple[bool, int, str | None, int | None, int | None, Media, str, Words]
# The body depends on both; caches (and CDNs told not to store it anyway) must know.
_VARY: Final = "Accept, Accept-Language"


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
        self._cache: dict[_Key, Entry] = {}
        self._negotiated: dict[tuple[Kind, str], Media] = {}
        self._stamp: tuple[int, bytes, bytes, str, str] = (-1, b"", b"", "", "")
        self._last_failure_log = -math.inf
        self._failures_since_log = 0
        problems: list[str] = []
        brand = settings.brand
        self._languages = Languages(brand)
        self._problem_base = brand.problem_base_url
        self._static = static_context(brand, self._debug, problems)
        self._template, builtin = load_template(brand.template_dir, self._static, problems)
        # The built-in page runs no script and loads nothing but the logo: say so to the
        # browser, so that even a missed escape could not run anything. A user's template
        # may load its own assets, so it gets no policy it did not ask for.
        self._csp = content_security_policy(self._static["logo_url"]) if builtin else None
        self.template_problems: tuple[str, ...] = tuple(problems)
        self._markers = Markers()

    # --- public ---------------------------------------------------------------------------

    def render(
        self,
        error: UpstreamError,
        *,
        request_id: str,
        accept: str | bytes | None = None,
        method: str = "GET",
        timings: Sequence[tuple[str, float, str | None]] = (),
        wants: Wants | None = None,
    ) -> RenderedError:
        """The response for ``error``. Never raises: on any failure, :meth:`fallback`.

        ``wants`` (the request's Accept, Accept-Language and fetch metadata) chooses the
        body and its language; without it, ``accept`` alone chooses the body.
        ``timings`` become a ``Server-Timing`` header in debug mode only.
        """
        status = 502
        try:
            status = clamp_status(error.status)
            proxy_error: str | None = error.proxy_error
            known = proxy_error is None or proxy_error in PROXY_ERROR_TYPES
            if not known:
                # The Proxy-Status header says the same (headers.proxy_status does this).
                proxy_error = "proxy_internal_error"
            received = clean_received(error.received_status)
            retry = retry_seconds(error.retry_after, status)
            media, words = self._negotiate(accept, wants)
            # Only the page depends on the method (a "Try again" link, a caution).
            method_class = classify_method(method) if media == "html" else ""
            key: _Key = (False, status, proxy_error, received, retry, media, method_class, words)
            situation = situation_of(status, proxy_error, known)
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
        wants: Wants | None = None,
    ) -> RenderedError:
        """The branded response for a 502/503/504 that the app itself returned.

        There is no error type to report (``Proxy-Status`` names only the service, with
        ``received-status`` when given). Pass the app's own ``Retry-After`` (in seconds) as
        ``retry_after`` to keep it; a 503 without one gets the default. Never raises.
        """
        status = clamp_status(status)
        try:
            received = clean_received(received_status)
            retry = retry_seconds(retry_after, status)
            media, words = self._negotiate(accept, wants)
            method_class = classify_method(method) if media == "html" else ""
            key: _Key = (True, status, None, received, retry, media, method_class, words)
            # Cached in debug mode too: there are no per-request details to show.
            entry = self._cache.get(key) or self._fill(key, app_situation(status))
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
            status = clamp_status(status)
            rid = clean_request_id(request_id)
            body = f"{status} {PHRASES.get(status, 'Server Error')}\n\nReference: {rid}\n"
            data = body.encode("ascii")
            headers = [
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(data))),
                ("cache-control", "no-store"),
                ("vary", _VARY),
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

    def _negotiate(self, accept: str | bytes | None, wants: Wants | None) -> tuple[Media, Words]:
        if wants is None:
            return negotiate_cached(accept, self._negotiated), self._languages.default
        media = negotiate_cached(wants.accept, self._negotiated, wants.kind)
        return media, self._languages.choose(wants.language)

    def _emit(self, entry: Entry, request_id: str, method: str) -> RenderedError:
        rid = clean_request_id(request_id)
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

    def _fill(self, key: _Key, situation: str) -> Entry:
        return remember(self._cache, key, self._build(key, situation))

    def _page(
        self, key: _Key, situation: str, details: Mapping[str, Any] | None = None
    ) -> tuple[Page, Media]:
        """The page a cache key describes, and the media to render it in."""
        app, status, proxy_error, received, retry, media, method_class, words = key
        if media == "html" and self._template is None:
            media = "text"  # the built-in template failed to load: plain text still informs
        page = Page(
            status=status,
            situation=situation,
            proxy_error=proxy_error,
            received_status=received,
            retry_after=retry,
            retry_link=method_class == "reload",
            caution=method_class == "unsafe",
            app=app,
            details=details,
            words=words,
            resubmit=method_class in ("idempotent", "unsafe"),
        )
        return page, media

    def _build(self, key: _Key, situation: str) -> Entry:
        page, media = self._page(key, situation)
        headers = self._headers(page, media)
        markers = self._markers
        body = self._body(page, media, *markers.first)
        fmt: bytes | None
        fmt, slots = markers.to_format(body)
        if media == "html" and not markers.exact(
            body, lambda rid, ts, iso: self._body(page, media, rid, ts, iso)
        ):
            fmt = None  # e.g. {{ request_id[:8] }} or |upper: render per request
        return Entry(page.status, media, tuple(headers), page, fmt, slots)

    def _headers(
        self,
        page: Page,
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
            ("vary", _VARY),
            ("content-language", page.words.tag),
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

    def _body(self, page: Page, media: Media, rid: str, ts: str, iso: str) -> bytes:
        if media == "html":
            return self._html(page, rid, ts, iso)
        if media == "json":
            return problem_json(page, rid, self._problem_base)
        return plain_text(page, self._static, rid, ts)

    def _html(self, page: Page, rid: str, ts: str, iso: str) -> bytes:
        assert self._template is not None  # _build switches to text when it is None
        # Autoescape is on for every template (ours and the user's): all values, the
        # request id and the debug exception text included, are HTML-escaped by Jinja.
        text = self._template.render(page_context(self._static, page, rid, ts, iso))
        # "replace": a lone surrogate in an exception message must not fail the page.
        return text.encode("utf-8", "replace")

    # --- debug ----------------------------------------------------------------------------

    def _debug_entry(
        self,
        error: UpstreamError,
        key: _Key,
        situation: str,
        timings: Sequence[tuple[str, float, str | None]],
    ) -> Entry:
        """An uncached entry with the error's internals: its body is rendered per request."""
        # An error's key, from render(): its ``app`` is always False.
        _, _, proxy_error, received, *_ = key
        attempts, elapsed, upstream = error.attempts, error.elapsed, error.upstream
        details = {
            "proxy_error": proxy_error,
            "received_status": received,
            "upstream": safe_str(upstream) if upstream is not None else None,
            "attempts": attempts if type(attempts) is int else None,
            "elapsed_ms": (
                round(elapsed * 1000, 1)
                if isinstance(elapsed, int | float) and math.isfinite(elapsed)
                else None
            ),
            "exception": exception_text(error),
        }
        page, media = self._page(key, situation, details)
        headers = self._headers(
            page,
            media,
            details=safe_str(error),
            next_hop=safe_str(upstream) if upstream is not None else None,
            timings=timings,
        )
        return Entry(page.status, media, tuple(headers), page, None, ())

    # --- set-up -----------------------------------------------------------------------------

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


_LAST_RESORT_BODY = b"502 Bad Gateway\n"
_LAST_RESORT_HEADERS = (
    ("content-type", "text/plain; charset=utf-8"),
    ("content-length", str(len(_LAST_RESORT_BODY))),
    ("cache-control", "no-store"),
)
