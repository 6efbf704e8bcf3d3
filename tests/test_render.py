"""Gateway error responses: negotiation, headers, the three bodies, branding, safety, caching."""

from __future__ import annotations

import json
import logging
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import http_sf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_guard._templates import page_context
from gateway_guard.errors import (
    CircuitOpenError,
    LoadShedError,
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from gateway_guard.render import (
    DEFAULT_503_RETRY_AFTER,
    PALETTE,
    ErrorRenderer,
    RenderedError,
    contrast_ratio,
    negotiate,
)
from gateway_guard.settings import BrandSettings, Settings

CHROME = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
SAFARI = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
AXIOS = "application/json, text/plain, */*"
ACCEPT_FOR = {"html": CHROME, "json": "application/problem+json", "text": "*/*"}
RID = "0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def make(
    *, debug: bool = False, clock: float = NOW, service: str = "shop", **brand: Any
) -> ErrorRenderer:
    settings = Settings(service=service, debug=debug, brand=BrandSettings(**brand))
    return ErrorRenderer(settings, clock=lambda: clock)


def headers_of(rendered: RenderedError) -> dict[str, str]:
    names = [name for name, _ in rendered.headers]
    assert len(names) == len(set(names)), f"repeated header: {names}"
    return dict(rendered.headers)


def parse_proxy_status(value: str) -> tuple[Any, dict[str, Any]]:
    parsed: Any = http_sf.parse(value.encode(), tltype="list")
    assert len(parsed) == 1
    member, params = parsed[0]
    return member, dict(params)


ERRORS: list[tuple[UpstreamError, int, str | None, int | None]] = [
    (UpstreamConnectError("x", proxy_error="dns_error"), 502, "dns_error", None),
    (UpstreamConnectError("x"), 502, "connection_refused", None),
    (
        UpstreamConnectError("x", proxy_error="tls_certificate_error"),
        502,
        "tls_certificate_error",
        None,
    ),
    (
        UpstreamTimeout("x", proxy_error="connection_read_timeout"),
        504,
        "connection_read_timeout",
        None,
    ),
    (UpstreamTimeout("x"), 504, "http_response_timeout", None),
    (
        UpstreamProtocolError("x", proxy_error="connection_terminated"),
        502,
        "connection_terminated",
        None,
    ),
    (UpstreamProtocolError("x"), 502, "http_protocol_error", None),
    (UpstreamStatusError("x", received_status=503), 502, None, 503),
    (CircuitOpenError("x", retry_after=12.5), 503, "destination_unavailable", None),
    (LoadShedError("x"), 503, "connection_limit_reached", None),
    (UpstreamConfigError("x"), 500, "proxy_configuration_error", None),
]
ERROR_IDS = [f"{type(e).__name__}-{p or r}" for e, _, p, r in ERRORS]


# --- negotiation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (CHROME, "html"),
        (FIREFOX, "html"),
        (SAFARI, "html"),
        ("text/html", "html"),
        ("TEXT/HTML", "html"),
        (" text/html ; q=0.8 , text/plain;q=0.5", "html"),
        (b"text/html", "html"),
        ("*/*", "text"),  # curl, fetch(), most HTTP libraries
        (None, "text"),
        ("", "text"),
        ("   ", "text"),
        ("text/plain", "text"),
        ("text/*", "text"),  # wildcards never select HTML
        ("image/avif,image/webp,*/*;q=0.8", "text"),  # an <img> pointing at a failing route
        ("application/json", "json"),
        ("application/problem+json", "json"),
        ("application/*+json", "json"),
        ("application/*", "json"),
        (AXIOS, "json"),
        ("text/html;q=0.5, application/json;q=0.9", "json"),
        ("application/json;q=0.5, text/html", "html"),
        ("text/html, application/json", "json"),  # a tie: json, then html, then text
        ("text/html, text/plain", "html"),
        ("text/html;q=0.9, */*", "text"),
        ("text/html;q=0, */*", "text"),
        ("application/problem+json;q=0, application/json", "text"),  # most specific wins
        ("application/json;q=0", "text"),
        ("application/vnd.api+json", "json"),  # every +json type reads problem+json
        ("application/hal+json;q=0.9, text/plain;q=0.8", "json"),
        ("application/xml", "text"),
        ("text/html;q=abc", "text"),  # an invalid q-value drops the range
        ("text/html;q=1.5", "text"),
        ("text/html;q=0.0001", "text"),
        ("text/html;level=1;q=0.7, text/plain;q=0.6", "html"),
        ("text/html;q=0.5;ext=1, application/json;q=0.4", "html"),
        ("garbage", "text"),
        (";;;,,,", "text"),
        ("text/", "text"),
        ("/html", "text"),
        ("*/html", "text"),
        ("text/html\x00", "text"),
        ("t\u00e9xt/html", "text"),
    ],
)
def test_negotiation(accept: str | bytes | None, expected: str) -> None:
    assert negotiate(accept) == expected
    # The renderer's cached path agrees, also on a second (cached) call.
    renderer = make()
    for _ in range(2):
        content_type = headers_of(renderer.render(LoadShedError(), request_id=RID, accept=accept))[
            "content-type"
        ]
        assert content_type.startswith(
            {"html": "text/html", "json": "application/problem+json", "text": "text/plain"}[
                expected
            ]
        )


@pytest.mark.implementation
def test_hostile_accept_headers_are_cheap_and_bounded() -> None:
    huge = "x/y;q=0.1," * 200_000 + "text/html"
    start = time.perf_counter()
    assert negotiate(huge) == "text"  # text/html lies beyond the 2048 characters read
    assert negotiate("," * 1_000_000) == "text"
    assert negotiate(";" * 1_000_000) == "text"
    assert negotiate("text/html" + ";q=1" * 100_000) == "html"
    assert time.perf_counter() - start < 0.5
    renderer = make()
    for i in range(1000):
        renderer.render(LoadShedError(), request_id=RID, accept=f"text/plain;x={i}")
    assert len(renderer._negotiated) <= 256


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_negotiation_never_fails(accept: str | bytes) -> None:
    assert negotiate(accept) in ("html", "json", "text")


# --- status, Proxy-Status, Retry-After ------------------------------------------------------


@pytest.mark.parametrize(("error", "status", "proxy_error", "received"), ERRORS, ids=ERROR_IDS)
@pytest.mark.parametrize("media", ["html", "json", "text"])
def test_each_error_class(
    error: UpstreamError, status: int, proxy_error: str | None, received: int | None, media: str
) -> None:
    rendered = make().render(error, request_id=RID, accept=ACCEPT_FOR[media])
    assert rendered.status == status
    member, params = parse_proxy_status(headers_of(rendered)["proxy-status"])
    assert member == http_sf.Token("shop")
    expected: dict[str, Any] = {}
    if proxy_error is not None:
        expected["error"] = http_sf.Token(proxy_error)
    if received is not None:
        expected["received-status"] = received
    assert params == expected  # never details or next-hop in production


def test_an_error_type_outside_the_registry_is_reported_as_proxy_internal_error() -> None:
    error = UpstreamError("x", proxy_error="made_up<script>", status=503)
    rendered = make().render(error, request_id=RID, accept="application/json")
    _, params = parse_proxy_status(headers_of(rendered)["proxy-status"])
    assert params == {"error": http_sf.Token("proxy_internal_error")}
    problem = json.loads(rendered.body)
    assert problem["proxy_error"] == "proxy_internal_error"
    assert problem["type"] == "about:blank"  # no brand.problem_base_url
    assert b"made_up" not in rendered.body


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (LoadShedError(), str(DEFAULT_503_RETRY_AFTER)),
        (CircuitOpenError(), str(DEFAULT_503_RETRY_AFTER)),
        (CircuitOpenError(retry_after=12.3), "13"),  # rounded up: never come back too early
        (CircuitOpenError(retry_after=0.0), "1"),  # never "0": no retry storms
        (CircuitOpenError(retry_after=-5.0), "1"),
        (CircuitOpenError(retry_after=float("nan")), "1"),
        (CircuitOpenError(retry_after=float("inf")), "86400"),
        (CircuitOpenError(retry_after=10**30), "86400"),
        (UpstreamTimeout(retry_after=2), "2"),  # known: sent on any status
        (UpstreamStatusError(received_status=429, retry_after=30.0), "30"),
        (UpstreamTimeout(), None),  # unknown on a 502/504: no header
        (UpstreamConnectError(), None),
        (UpstreamConfigError(), None),
    ],
)
def test_retry_after(error: UpstreamError, expected: str | None) -> None:
    for media in ("html", "json", "text"):
        rendered = make().render(error, request_id=RID, accept=ACCEPT_FOR[media])
        assert headers_of(rendered).get("retry-after") == expected
        if media == "json":
            problem = json.loads(rendered.body)
            assert problem.get("retry_after") == (None if expected is None else int(expected))


def test_the_page_says_when_to_try_again() -> None:
    renderer = make()
    cases = {1: "1 second", 30: "30 seconds", 300: "5 minutes", 7200: "2 hours"}
    for seconds, words in cases.items():
        error = CircuitOpenError(retry_after=seconds)
        for media in ("html", "text"):
            body = renderer.render(error, request_id=RID, accept=ACCEPT_FOR[media]).body
            assert f"try again in {words}.".encode() in body
    body = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME).body
    assert b"try again in a few moments" in body


# --- headers on every response --------------------------------------------------------------

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_LOWER_TOKEN = re.compile(r"[a-z0-9-]+")


def assert_sendable(rendered: RenderedError) -> None:
    for name, value in rendered.headers:
        assert isinstance(name, str) and isinstance(value, str)
        assert _LOWER_TOKEN.fullmatch(name), name
        assert _PRINTABLE_ASCII.fullmatch(value), (name, value)


@pytest.mark.parametrize(("error", "status", "proxy_error", "received"), ERRORS, ids=ERROR_IDS)
@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_required_headers_on_every_response(
    error: UpstreamError, status: int, proxy_error: str | None, received: int | None, debug: bool
) -> None:
    renderer = make(debug=debug)
    for media, accept in ACCEPT_FOR.items():
        for method in ("GET", "POST", "HEAD"):
            rendered = renderer.render(error, request_id=RID, accept=accept, method=method)
            assert_sendable(rendered)
            headers = headers_of(rendered)
            assert headers["cache-control"] == "no-store"
            assert headers["vary"] == "Accept, Accept-Language"
            assert headers["x-request-id"] == RID
            assert headers["x-content-type-options"] == "nosniff"
            assert "proxy-status" in headers
            if media != "json":
                assert headers["content-type"].endswith("; charset=utf-8")
            if status == 503:
                assert "retry-after" in headers
            assert ("server-timing" in headers) is False  # no timings were given
            assert ("content-security-policy" in headers) == (media == "html")
            if method != "HEAD":
                assert int(headers["content-length"]) == len(rendered.body) > 0


@pytest.mark.parametrize("media", ["html", "json", "text"])
@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_head_has_the_get_headers_and_no_body(media: str, debug: bool) -> None:
    renderer = make(debug=debug)
    error = CircuitOpenError("x", retry_after=3)
    get = renderer.render(error, request_id=RID, accept=ACCEPT_FOR[media], method="GET")
    head = renderer.render(error, request_id=RID, accept=ACCEPT_FOR[media], method="HEAD")
    assert head.body == b""
    assert head.status == get.status
    # RFC 9110 §8.6: Content-Length of a HEAD response is that of the GET body.
    assert head.headers == get.headers
    assert int(headers_of(head)["content-length"]) == len(get.body)


def test_server_timing_and_proxy_status_details_in_debug_only() -> None:
    error = UpstreamTimeout(
        'read timed out from payments.internal "quoted"\r\nX-Evil: 1', upstream="payments"
    )
    timings = [("total", 0.0123, None), ("upstream-payments", 0.01, "read timeout\r\n")]
    production = make().render(error, request_id=RID, timings=timings)
    assert "server-timing" not in headers_of(production)
    debug = make(debug=True).render(error, request_id=RID, timings=timings)
    assert_sendable(debug)
    headers = headers_of(debug)
    assert headers["server-timing"].startswith("total;dur=12.3, upstream-payments;dur=10;desc=")
    _, params = parse_proxy_status(headers["proxy-status"])
    assert params["next-hop"] == "payments"
    assert params["details"] == 'read timed out from payments.internal "quoted"  X-Evil: 1'
    assert params["error"] == http_sf.Token("http_response_timeout")


def test_unusable_timings_do_not_cost_the_debug_page() -> None:
    rendered = make(debug=True).render(
        UpstreamTimeout(),
        request_id=RID,
        timings=[("x", "not a number", None)],  # type: ignore[list-item]
    )
    assert rendered.status == 504
    assert "server-timing" not in headers_of(rendered)
    assert b"Reference" in rendered.body


# --- problem+json ----------------------------------------------------------------------------


def test_problem_json_in_production() -> None:
    error = UpstreamStatusError(
        "payments answered 503 at http://payments.internal:8080/charge",
        upstream="payments",
        attempts=3,
        elapsed=1.5,
        received_status=503,
    )
    rendered = make().render(error, request_id=RID, accept="application/json")
    assert headers_of(rendered)["content-type"] == "application/problem+json"
    assert rendered.body.isascii()
    assert json.loads(rendered.body) == {
        "type": "about:blank",  # RFC 9457 §4.2.1: title is then the status phrase
        "title": "Bad Gateway",
        "status": 502,
        "detail": "A service we depend on answered with an error.",
        "instance": f"urn:request:{RID}",
        "request_id": RID,
        "received_status": 503,
    }


def test_problem_json_in_debug_mode() -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    error = UpstreamConnectError(
        "connect to <payments.internal> failed", upstream="payments", attempts=2, elapsed=0.0421
    )
    error.__cause__ = cause
    rendered = make(debug=True).render(error, request_id=RID, accept="application/problem+json")
    problem = json.loads(rendered.body)
    assert problem["type"] == "about:blank"
    assert problem["proxy_error"] == "connection_refused"
    assert problem["upstream"] == "payments"
    assert problem["attempts"] == 2
    assert problem["elapsed_ms"] == 42.1
    assert problem["exception"] == (
        "UpstreamConnectError: connect to <payments.internal> failed\n"
        "caused by ConnectionRefusedError: [Errno 111] Connection refused"
    )
    # The angle brackets are \u escapes in the raw body: inert even if rendered as HTML.
    assert b"<" not in rendered.body and b">" not in rendered.body


def test_problem_json_stays_valid_for_odd_debug_values() -> None:
    error = UpstreamTimeout("\ud800 lone surrogate \x00", upstream="\u2028")
    error.elapsed = float("nan")
    error.attempts = "three"  # type: ignore[assignment]
    rendered = make(debug=True).render(error, request_id=RID, accept="application/json")
    problem = json.loads(rendered.body)
    assert problem["elapsed_ms"] is None
    assert problem["attempts"] is None
    assert rendered.body.isascii()


# --- the HTML page --------------------------------------------------------------------------


class _Outline(HTMLParser):
    """What the accessibility checks need from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h1_text: list[str] = []
        self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_h1 = self._in_h1 or tag == "h1"

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.h1_text.append(data)

    def find(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def outline(body: bytes) -> _Outline:
    parser = _Outline()
    parser.feed(body.decode("utf-8"))
    return parser


BRAND: dict[str, Any] = {
    "name": "Acme Shop",
    "logo_url": "https://cdn.acme.example/logo.svg",
    "accent_color": "#5b21b6",
    "support_url": "https://acme.example/support",
    "status_url": "https://status.acme.example",
    "lang": "de-CH",
}


@pytest.mark.parametrize(("error", "status", "proxy_error", "received"), ERRORS, ids=ERROR_IDS)
def test_html_structure(
    error: UpstreamError, status: int, proxy_error: str | None, received: int | None
) -> None:
    rendered = make(**BRAND).render(error, request_id=RID, accept=CHROME)
    body = rendered.body
    text = body.decode("utf-8")
    assert text.startswith("<!doctype html>\n")
    page = outline(body)
    # lang = "de-CH" makes German the default: the page is German and says which German.
    assert page.find("html") == [{"lang": "de-CH", "dir": "ltr"}]
    assert {"charset": "utf-8"} in page.find("meta")
    assert any(m.get("name") == "viewport" for m in page.find("meta"))
    assert len(page.find("title")) == 1
    assert len(page.find("h1")) == 1 and "".join(page.h1_text).strip()
    assert "<script" not in text.lower()
    assert "http-equiv" not in text.lower()  # no timed refresh, nothing else either
    assert not page.find("link") and "@import" not in text and "url(" not in text
    assert RID in text
    assert '<time datetime="2023-11-14T22:13:20Z">2023-11-14 22:13:20 UTC</time>' in text
    assert f"Fehler {status}" in text
    hrefs = [a.get("href") for a in page.find("a")]
    assert "/" in hrefs  # brand.home_url's default: the way back to the site
    assert "https://status.acme.example" in hrefs
    assert "https://acme.example/support" in hrefs
    images = page.find("img")
    assert images == [{"src": "https://cdn.acme.example/logo.svg", "alt": "Acme Shop"}]
    assert "#5b21b6" in text


def test_html_without_optional_branding() -> None:
    text = make().render(LoadShedError(), request_id=RID, accept=CHROME).body.decode()
    page = outline(text.encode())
    assert not page.find("img")
    assert [a.get("href") for a in page.find("a")] == ["", "/"]  # "Try again", home
    assert "status page" not in text and "Contact support" not in text


def test_try_again_link_and_caution_depend_on_the_method() -> None:
    renderer = make()
    get = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME, method="GET").body
    post = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME, method="POST").body
    put = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME, method="PUT").body
    assert b">Try again</a>" in get and b"went through" not in get
    # The link would reload with GET: offered for GET and HEAD only.
    assert b">Try again</a>" not in post and b"went through" in post
    assert b">Try again</a>" not in put and b"went through" not in put


@pytest.mark.parametrize(
    ("error", "heading"),
    [
        (UpstreamTimeout(), "This is taking too long"),
        (UpstreamConnectError(proxy_error="dns_error"), "We can&#39;t reach part of our service"),
        (CircuitOpenError(), "Temporarily unavailable"),
        (LoadShedError(), "We&#39;re very busy right now"),
        (UpstreamStatusError(received_status=500), "Something went wrong on our side"),
        (UpstreamConfigError(), "Something went wrong on our side"),
    ],
)
def test_each_situation_has_its_own_words(error: UpstreamError, heading: str) -> None:
    body = make().render(error, request_id=RID, accept=CHROME).body.decode()
    assert f"<h1>{heading}</h1>" in body


def test_contrast_of_the_default_palette_meets_wcag_aa() -> None:
    for scheme in PALETTE.values():
        for foreground, background in [
            ("text", "card"),
            ("text", "bg"),
            ("muted", "card"),
            ("text", "code"),
            ("text", "debug"),
        ]:
            ratio = contrast_ratio(scheme[foreground], scheme[background])
            assert ratio >= 4.5, (foreground, background, ratio)
        # The debug box's dashed border is a boundary: 3:1 for non-text contrast.
        assert contrast_ratio(scheme["debug_line"], scheme["debug"]) >= 3


@pytest.mark.implementation
@pytest.mark.parametrize("accent", ["#fde047", "#ffffff", "#000000", "#5b21b6", "#2563eb", "#0f0"])
def test_links_are_readable_whatever_the_accent(accent: str) -> None:
    context = make(accent_color=accent)._static
    assert contrast_ratio(context["accent_ink"], PALETTE["light"]["card"]) >= 4.5
    assert contrast_ratio(context["accent_ink_dark"], PALETTE["dark"]["card"]) >= 4.5


# --- what production never shows --------------------------------------------------------------

SECRETS = [
    "payments.internal",
    "10.0.3.7",
    "http://",
    "/v1/charge",
    "Errno",
    "ConnectionRefusedError",
    "Traceback",
    "secret-upstream-name",
    "UpstreamConnectError",
]


def _leaky_error() -> UpstreamError:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused to 10.0.3.7")
        except ConnectionRefusedError as exc:
            raise UpstreamConnectError(
                "connect to http://payments.internal:8080/v1/charge failed: Errno 111",
                upstream="secret-upstream-name",
                attempts=3,
                elapsed=2.5,
                retry_after=4,
            ) from exc
    except UpstreamConnectError as error:
        return error


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("media", ["html", "json", "text"])
def test_production_never_shows_internals(media: str, method: str) -> None:
    rendered = make(**BRAND).render(
        _leaky_error(),
        request_id=RID,
        accept=ACCEPT_FOR[media],
        method=method,
        timings=[("secret-upstream-name", 1.0, "payments.internal")],
    )
    everything = rendered.body.decode() + repr(rendered.headers)
    for secret in SECRETS:
        assert secret not in everything, secret


def test_debug_mode_shows_internals_escaped() -> None:
    error = _leaky_error()
    error.args = ("<script>alert('x')</script> at http://payments.internal",)
    error.upstream = "pay<ments>"
    renderer = make(debug=True)
    page = renderer.render(error, request_id=RID, accept=CHROME).body.decode()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; at http://payments.internal" in page
    assert "pay&lt;ments&gt;" in page
    assert "caused by ConnectionRefusedError" in page
    assert "<script" not in page
    assert "Details (debug mode)" in page
    text = renderer.render(error, request_id=RID, accept="*/*").body.decode()
    assert "Upstream: pay<ments>" in text and "Attempts: 3" in text
    assert "\n  caused by ConnectionRefusedError: [Errno 111]" in text


# --- hostile input --------------------------------------------------------------------------

# Arbitrary text (any code point, lone surrogates included) mixed with the usual payloads.
hostile_text = st.lists(
    st.text(st.characters(codec=None), max_size=8)
    | st.sampled_from(["<script>", "</", '"', "'", "\r\n", "&", "\x00", "\u2028", "%s"]),
    max_size=10,
).map("".join)


# The characters that are markup in HTML. Escaped, each becomes one of these references.
_MARKUP = str.maketrans(dict.fromkeys("<>&\"'", "_"))
_ESCAPED = re.compile(r"&(?:amp|lt|gt|quot|#34|#39|#x27);")


def defanged(value: str) -> str:
    """``value`` with every markup character replaced by ``_`` (length and all else kept)."""
    return value.translate(_MARKUP)


class _Markup(HTMLParser):
    """Every piece of markup a parser finds in a page, and the text it decodes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.events: list[tuple[str, ...]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("start", tag, *(f"{k}={v}" for k, v in attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("startend", tag, *(f"{k}={v}" for k, v in attrs)))

    def handle_endtag(self, tag: str) -> None:
        self.events.append(("end", tag))

    def handle_data(self, data: str) -> None:
        self.events.append(("data", data))

    def handle_comment(self, data: str) -> None:
        self.events.append(("comment", data))

    def handle_decl(self, decl: str) -> None:
        self.events.append(("decl", decl))

    def handle_pi(self, data: str) -> None:
        self.events.append(("pi", data))

    def unknown_decl(self, data: str) -> None:
        self.events.append(("unknown", data))


def markup_of(page: str) -> list[tuple[str, ...]]:
    parser = _Markup()
    parser.feed(page)
    parser.close()
    # Adjacent text pieces are one text node; the parser may split them anywhere.
    merged: list[tuple[str, ...]] = []
    for event in parser.events:
        if event[0] == "data" and merged and merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + event[1])
        else:
            merged.append(event)
    return merged


def assert_only_escaped(page: str, twin: str) -> None:
    """``page`` shows hostile values that ``twin`` shows defanged: only as escaped text.

    Each markup character of a value becomes ``_`` in the twin, so the two pages differ
    only where a value had one. Escaped, the page has a character reference there, which
    the parser decodes back into text: the element tree, every attribute and every URL
    are the twin's, and the text differs only by the characters themselves.
    """
    got, expected = markup_of(page), markup_of(twin)
    got_tags = [e[:2] for e in got if e[0] != "data"]
    expected_tags = [e[:2] for e in expected if e[0] != "data"]
    assert got_tags == expected_tags, "an element was injected or broken"
    for event in got:
        if event[0] in ("start", "startend"):
            for attr in event[2:]:
                name, _, value = attr.partition("=")
                assert not name.startswith("on"), attr
                assert not value.strip().lower().startswith(("javascript:", "data:")), attr
    # Attributes and text decode to the same content, markup characters apart: no
    # attribute was cut short by a quote, none was added.
    assert [tuple(map(defanged, e)) for e in got] == [tuple(map(defanged, e)) for e in expected]
    # And in the raw page, where the twin has "_", the page has a reference: every
    # markup character of every value went out escaped, none raw.
    assert _ESCAPED.sub("_", page) == _ESCAPED.sub("_", twin)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(request_id=hostile_text, message=hostile_text, upstream=hostile_text, debug=st.booleans())
def test_hostile_input_is_escaped_everywhere(
    request_id: str, message: str, upstream: str, debug: bool
) -> None:
    # Settings refuse lone surrogates (they are not valid text); everything else goes. With
    # a logo, the name is an attribute value (alt) as well as text.
    name = "".join(c for c in message[:50] if not 0xD800 <= ord(c) <= 0xDFFF)
    logo = "https://cdn.example/logo.svg"
    renderer = make(debug=debug, name=name, logo_url=logo)
    error = UpstreamStatusError(message, upstream=upstream, received_status=503, retry_after=1.5)
    for media, accept in ACCEPT_FOR.items():
        rendered = renderer.render(error, request_id=request_id, accept=accept)
        assert rendered.status == 502
        assert_sendable(rendered)
        headers = headers_of(rendered)
        parse_proxy_status(headers["proxy-status"])
        assert int(headers["content-length"]) == len(rendered.body)
        text = rendered.body.decode("utf-8")
        if media == "json":
            json.loads(text)
            assert "<" not in text
        elif media == "html":
            # The same page for the same values, defanged: what the page must look like.
            twin_error = UpstreamStatusError(
                defanged(message),
                upstream=defanged(upstream),
                received_status=503,
                retry_after=1.5,
            )
            twin = make(debug=debug, name=defanged(name), logo_url=logo).render(
                twin_error, request_id=defanged(request_id), accept=accept
            )
            assert_only_escaped(text, twin.body.decode("utf-8"))
        else:
            # Plain text has nothing to escape; it must not be able to forge lines.
            assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text)
        # Whatever the id was, the reference is one string in the header and every body.
        assert headers["x-request-id"] in text


def test_the_escaping_check_catches_what_escaping_would_prevent() -> None:
    # The check above must be able to fail: each of these is what one missed escape makes.
    twin = '<p title="a_b">x_y</p><img alt="n_m" src="/l.svg">'
    for unescaped in (
        '<p title="a_b">x<b>y</p><img alt="n_m" src="/l.svg">',  # an injected element
        '<p title="a"b">x_y</p><img alt="n_m" src="/l.svg">',  # a quote that ends the value
        '<p title="a_b">x_y</p><img alt="n" onerror="m" src="/l.svg">',  # an injected handler
        '<p title="a_b">x&y</p><img alt="n_m" src="/l.svg">',  # a raw & (harmless here, but raw)
    ):
        with pytest.raises(AssertionError):
            assert_only_escaped(unescaped, twin)
    assert_only_escaped('<p title="a&#34;b">x&lt;y</p><img alt="n&#39;m" src="/l.svg">', twin)


@pytest.mark.parametrize(
    ("request_id", "expected"),
    [
        ("abc-123", "abc-123"),
        ("<script>alert(1)</script>", "_script_alert_1__/script_"),
        ("id\r\nX-Evil: 1", "id__X-Evil:_1"),
        ("caf\u00e9", "caf_"),
        ("", "-"),
        ("x" * 500, "x" * 128),
    ],
)
def test_request_ids_are_reduced_to_the_request_id_alphabet(request_id: str, expected: str) -> None:
    for media in ("html", "json", "text"):
        rendered = make().render(LoadShedError(), request_id=request_id, accept=ACCEPT_FOR[media])
        assert headers_of(rendered)["x-request-id"] == expected
        assert expected.encode() in rendered.body


def test_settings_built_without_validation_cannot_inject() -> None:
    # Settings(...) skips check_settings; the renderer checks colours and URLs again.
    renderer = make(
        name="<b>Acme</b>",
        accent_color="red;}</style><script>alert(1)</script>",
        status_url="javascript:alert(1)",
        support_url="//evil.example",
        logo_url='https://cdn.example/logo.svg" onerror="alert(1)',
    )
    assert len(renderer.template_problems) == 4
    text = renderer.render(LoadShedError(), request_id=RID, accept=CHROME).body.decode()
    assert "<script" not in text and "javascript:" not in text and "evil" not in text
    assert "onerror" not in text
    assert "&lt;b&gt;Acme&lt;/b&gt;" in text
    assert "--accent: #2563eb" in text


# --- templates ---------------------------------------------------------------------------------


def test_user_template_overrides_the_page(tmp_path: Path) -> None:
    (tmp_path / "error.html").write_text(
        "<!doctype html><title>{{ brand_name }}</title><h1>{{ heading }}</h1>"
        "<p>{{ status }} {{ situation }} {{ retry_after }} ref={{ request_id }}"
        " at {{ timestamp }}</p>",
        encoding="utf-8",
    )
    renderer = make(template_dir=str(tmp_path), name="<Acme & Co>")
    assert renderer.template_problems == ()
    rendered = renderer.render(LoadShedError(), request_id="r-1", accept=CHROME)
    assert rendered.body.decode() == (
        "<!doctype html><title>&lt;Acme &amp; Co&gt;</title><h1>We&#39;re very busy right now</h1>"
        "<p>503 overloaded 5 ref=r-1 at 2023-11-14 22:13:20 UTC</p>"
    )
    # A user's template may load its own assets: no policy is imposed on it.
    assert "content-security-policy" not in headers_of(rendered)
    # The other media types are not templated.
    assert (
        make(template_dir=str(tmp_path))
        .render(LoadShedError(), request_id="r-1", accept="application/json")
        .body.startswith(b'{"type"')
    )


def test_user_template_can_extend_the_built_in_one(tmp_path: Path) -> None:
    (tmp_path / "error.html").write_text(
        '{% extends "gateway_guard/error.html" %}'
        "{% block head %}<meta name=x-brand content=acme>{% endblock %}"
        "{% block reference %}<p>Ref {{ request_id }}</p>{% endblock %}",
        encoding="utf-8",
    )
    renderer = make(template_dir=str(tmp_path))
    text = renderer.render(UpstreamTimeout(), request_id="r-9", accept=CHROME).body.decode()
    assert "<meta name=x-brand content=acme>" in text
    assert "<p>Ref r-9</p>" in text
    assert "<h1>This is taking too long</h1>" in text


def test_a_template_that_transforms_per_request_values_is_rendered_per_request(
    tmp_path: Path,
) -> None:
    (tmp_path / "error.html").write_text(
        "{{ request_id[:3] }}|{{ request_id|upper }}|{{ request_id|length }}|{{ timestamp[:4] }}",
        encoding="utf-8",
    )
    renderer = make(template_dir=str(tmp_path))
    for rid in ("abcdef", "xyz12345"):
        body = renderer.render(LoadShedError(), request_id=rid, accept=CHROME).body.decode()
        assert body == f"{rid[:3]}|{rid.upper()}|{len(rid)}|2023"


def test_a_template_with_a_syntax_error_is_reported_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "error.html").write_text("<h1>{{ heading </h1>\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="gateway_guard"):
        renderer = make(template_dir=str(tmp_path))
    assert len(renderer.template_problems) == 1
    assert "error.html, line 1" in renderer.template_problems[0]
    assert "error.html, line 1" in caplog.text
    rendered = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME)
    assert rendered.status == 504
    assert b"<h1>This is taking too long</h1>" in rendered.body  # the built-in page


def test_a_template_failing_at_render_time_gives_the_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "error.html").write_text(
        "{% if status == 504 %}{{ no_such_thing.attribute }}{% endif %}<h1>{{ heading }}</h1>",
        encoding="utf-8",
    )
    renderer = make(template_dir=str(tmp_path))
    assert renderer.template_problems == ()  # it renders fine for the start-up sample
    with caplog.at_level(logging.ERROR, logger="gateway_guard"):
        rendered = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME)
        again = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME)
        head = renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME, method="HEAD")
    assert rendered.status == again.status == head.status == 504
    assert rendered.body == f"504 Gateway Timeout\n\nReference: {RID}\n".encode()
    assert head.body == b""
    assert_sendable(rendered)
    assert headers_of(rendered)["content-type"] == "text/plain; charset=utf-8"
    # One traceback per interval, not one per failure.
    records = [r for r in caplog.records if "rendering a 504 response failed" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
    # Other statuses still render with the user's template.
    assert (
        make(template_dir=str(tmp_path)).render(LoadShedError(), request_id=RID, accept=CHROME).body
        == b"<h1>We&#39;re very busy right now</h1>"
    )


def test_a_template_dir_without_error_html_uses_the_built_in_page(tmp_path: Path) -> None:
    renderer = make(template_dir=str(tmp_path))
    assert "no error.html" in renderer.template_problems[0]
    assert (
        b"<!doctype html>" in renderer.render(LoadShedError(), request_id=RID, accept=CHROME).body
    )


# --- fallback ---------------------------------------------------------------------------------


def test_render_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway_guard"):
        rendered = make().render(object(), request_id=RID)  # type: ignore[arg-type]
    assert rendered.status == 502
    assert rendered.body == f"502 Bad Gateway\n\nReference: {RID}\n".encode()
    assert "rendering a 502 response failed" in caplog.text


@pytest.mark.parametrize(
    ("status", "request_id", "expected_status"),
    [(503, RID, 503), (504, "a\r\nb", 504), (200, RID, 502), ("x", None, 502), (True, RID, 502)],
)
def test_fallback(status: Any, request_id: Any, expected_status: int) -> None:
    rendered = make().fallback(status, request_id)
    assert rendered.status == expected_status
    assert_sendable(rendered)
    headers = headers_of(rendered)
    assert int(headers["content-length"]) == len(rendered.body)
    assert parse_proxy_status(headers["proxy-status"]) == (http_sf.Token("shop"), {})
    assert ("retry-after" in headers) == (expected_status == 503)


# --- caching ------------------------------------------------------------------------------------


def test_the_cache_is_bounded() -> None:
    renderer = make()
    for seconds in range(1, 1001):
        rendered = renderer.render(
            CircuitOpenError(retry_after=seconds), request_id=RID, accept=CHROME
        )
        assert headers_of(rendered)["retry-after"] == str(seconds)
        assert renderer.cache_size <= 256


def test_cached_pages_carry_each_request_s_id_and_time() -> None:
    clock = [NOW]
    renderer = ErrorRenderer(Settings(service="shop"), clock=lambda: clock[0])
    first = renderer.render(LoadShedError(), request_id="first", accept=CHROME)
    clock[0] += 61
    second = renderer.render(LoadShedError(), request_id="second-id", accept=CHROME)
    assert renderer.cache_size == 1
    assert b"first" in first.body and b"first" not in second.body
    assert b"second-id" in second.body
    assert b"22:13:20 UTC" in first.body and b"22:14:21 UTC" in second.body
    assert len(second.body) == len(first.body) + len("second-id") - len("first")


def test_debug_mode_does_not_cache_errors() -> None:
    renderer = make(debug=True)
    renderer.render(UpstreamTimeout("one"), request_id=RID, accept=CHROME)
    renderer.render(UpstreamTimeout("two"), request_id=RID, accept=CHROME)
    assert renderer.cache_size == 0


def test_percent_signs_survive_the_cached_format(tmp_path: Path) -> None:
    (tmp_path / "error.html").write_text("100% {{ request_id }} %s %b %%", encoding="utf-8")
    body = make(template_dir=str(tmp_path)).render(LoadShedError(), request_id="r", accept=CHROME)
    assert body.body == b"100% r %s %b %%"


# --- render_status --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "heading", "retry_after"),
    [
        (502, "Something went wrong on our side", None),
        (503, "Temporarily unavailable", str(DEFAULT_503_RETRY_AFTER)),
        (504, "This is taking too long", None),
    ],
)
def test_render_status_for_app_errors(status: int, heading: str, retry_after: str | None) -> None:
    renderer = make()
    page = renderer.render_status(status, request_id=RID, accept=CHROME)
    assert page.status == status
    assert f"<h1>{heading}</h1>".encode() in page.body
    headers = headers_of(page)
    assert headers.get("retry-after") == retry_after
    assert parse_proxy_status(headers["proxy-status"]) == (http_sf.Token("shop"), {})
    problem = json.loads(
        renderer.render_status(status, request_id=RID, accept="application/json").body
    )
    assert problem["type"] == "about:blank"
    titles = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
    assert problem["title"] == titles[status]
    assert "proxy_error" not in problem


def test_render_status_keeps_the_app_s_retry_after_and_received_status() -> None:
    page = make().render_status(
        503, request_id=RID, accept="*/*", method="HEAD", received_status=503, retry_after=42
    )
    headers = headers_of(page)
    assert headers["retry-after"] == "42"
    assert parse_proxy_status(headers["proxy-status"]) == (
        http_sf.Token("shop"),
        {"received-status": 503},
    )
    assert page.body == b""
    assert_sendable(page)


# --- docs/error-pages.md stays true -------------------------------------------------------------

DOC = Path(__file__).parent.parent / "docs" / "error-pages.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _doc_blocks(lang: str) -> list[str]:
    return [m[2] for m in _FENCE.finditer(DOC.read_text(encoding="utf-8")) if m[1] == lang]


def _doc_section(heading: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    end = text.find("\n#", start + len(heading) + 2)
    return text[start : end if end != -1 else len(text)]


def test_doc_has_a_row_for_every_error_type_we_emit() -> None:
    from gateway_guard import errors
    from gateway_guard.headers import PROXY_ERROR_TYPES

    source = Path(errors.__file__).read_text(encoding="utf-8")
    emitted = set(re.findall(r'"([a-z_]+)"', source)) & PROXY_ERROR_TYPES
    anchors = set(re.findall(r'<a id="([a-z_]+)"></a>', DOC.read_text(encoding="utf-8")))
    assert emitted <= anchors, f"no row in docs/error-pages.md for {emitted - anchors}"
    assert anchors <= PROXY_ERROR_TYPES | {"upstream_status"}


@pytest.mark.implementation
def test_doc_lists_every_template_variable() -> None:
    documented = set(
        re.findall(r"^\| `([a-z_]+)` \|", _doc_section("### Template variables"), re.M)
    )
    renderer = make(debug=True)
    words = renderer._languages.default
    key = (False, 504, "http_response_timeout", None, None, "html", "reload", words)
    page = renderer._debug_entry(UpstreamTimeout(), key, "timeout", ()).page  # type: ignore[arg-type]
    assert documented == set(page_context(renderer._static, page, "rid", "ts", "iso"))


def test_doc_templates_render(tmp_path: Path) -> None:
    templates = _doc_blocks("jinja")
    assert len(templates) == 2
    errors = [error for error, *_ in ERRORS]
    for i, template in enumerate(templates):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "error.html").write_text(template, encoding="utf-8")
        for debug in (False, True):
            renderer = make(debug=debug, template_dir=str(folder), **BRAND)
            assert renderer.template_problems == ()
            for error in errors:
                for method in ("GET", "POST"):
                    page = renderer.render(error, request_id=RID, accept=CHROME, method=method)
                    assert headers_of(page)["content-type"] == "text/html; charset=utf-8"
                    assert page.status == error.status
                    assert RID.encode() in page.body and b"<h1>" in page.body
            app = renderer.render_status(503, request_id=RID, accept=CHROME)
            assert app.status == 503 and b"<h1>" in app.body


def test_doc_toml_examples_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    from gateway_guard.settings import load_settings

    monkeypatch.chdir(tmp_path)
    blocks = _doc_blocks("toml")
    assert blocks
    for block in blocks:
        raw = tomllib.loads(block)
        if "template_dir" in raw["brand"]:
            (tmp_path / raw["brand"]["template_dir"]).mkdir(parents=True, exist_ok=True)
        load_settings(raw, environ={})


def test_doc_problem_json_example_matches_the_real_thing() -> None:
    (example,) = [json.loads(block) for block in _doc_blocks("json")]
    real = json.loads(
        make(problem_base_url="https://acme.example/problems/")
        .render(
            CircuitOpenError(retry_after=12.3),
            request_id=example["request_id"],
            accept="application/json",
        )
        .body
    )
    assert real == example


@pytest.mark.implementation
def test_without_any_usable_template_html_requests_get_plain_text(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway_guard import _templates

    def broken(user_loader: object) -> None:
        raise OSError("templates missing from the installation")

    monkeypatch.setattr(_templates, "environment", broken)
    with caplog.at_level(logging.ERROR, logger="gateway_guard"):
        renderer = make()
    assert "built-in error page cannot be loaded" in caplog.text
    for debug_renderer in (renderer, make(debug=True)):
        rendered = debug_renderer.render(UpstreamTimeout(), request_id=RID, accept=CHROME)
        assert rendered.status == 504
        assert headers_of(rendered)["content-type"] == "text/plain; charset=utf-8"
        assert b"did not answer in time" in rendered.body


def test_the_text_page_never_emits_a_line_separator() -> None:
    # Settings(...) skips check_settings, so the renderer must not trust the URLs.
    renderer = make(
        status_url="https://s.example/\u2028Forged: 1", support_url="https://s.example/\x85x"
    )
    text = renderer.render(LoadShedError(), request_id=RID, accept="text/plain").body.decode()
    assert "\u2028" not in text and "\x85" not in text
    assert not any(line.startswith("Forged") for line in text.splitlines())
