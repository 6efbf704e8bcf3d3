"""The error pages in a real browser: headless Chromium, screenshots, console, axe-core.

A Starlette app behind the middleware calls the misbehaving upstream, which is made to
fail three ways (a 503 with Retry-After, a refused connection, a hang), so that the visitor
sees the 503, 502 and 504 pages exactly as a browser navigation receives them. Each page is
opened at desktop and phone widths; screenshots land in test-artifacts/browser/.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import gateway_guard as gg
from browser import Browser, artifacts_dir, chromium
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_asgi

pytestmark = pytest.mark.e2e

BRAND = {
    "name": "Acme Shop",
    "support_url": "https://acme.example/support",
    "status_url": "https://status.acme.example",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def site(upstream: MisbehavingUpstream) -> Iterator[str]:
    guard = gg.Guard(
        gg.load_settings(
            {
                "service": "shop",
                "brand": BRAND,
                "defaults": {
                    "connect_timeout": 0.3,
                    "read_timeout": 0.3,
                    "deadline": 1.0,
                    "retry": {"attempts": 1},
                },
                "upstreams": {"catalog": {"base_url": upstream.url}},
            }
        )
    )

    async def page(request: Request) -> PlainTextResponse:
        async with guard.async_client("catalog") as client:
            response = await client.get("/items")
        return PlainTextResponse(response.text)

    app = Starlette(routes=[Route("/items", page)])
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    with serve_asgi(app) as url:
        yield url


@pytest.mark.parametrize(
    ("mode", "status"),
    [("status", 503), ("refuse", 502), ("hang", 504)],
)
def test_error_page_in_chromium(
    browser: Browser, site: str, upstream: MisbehavingUpstream, mode: str, status: int
) -> None:
    if mode == "status":
        upstream.set_mode(mode, status=503, retry_after="30")
    else:
        upstream.set_mode(mode)
    page = browser.check(f"{site}/items", f"error-{status}")
    assert "Acme Shop" in page.title
    assert page.lang
    assert len(page.screenshots) == 2


# --- the page in the visitor's language, with the countdown and the logo ---------------------

LOGO = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="40" viewBox="0 0 160 40">'
    '<rect width="40" height="40" rx="8" fill="#5b21b6"/>'
    '<text x="50" y="27" font-family="sans-serif" font-size="18" fill="#5b21b6">Acme</text></svg>'
)


@pytest.fixture
def branded_site(upstream: MisbehavingUpstream) -> Iterator[str]:
    guard = gg.Guard(
        gg.load_settings(
            {
                "service": "shop",
                "brand": {**BRAND, "logo_url": "/static/logo.svg", "accent_color": "#5b21b6"},
                "defaults": {"retry": {"attempts": 1}},
                "upstreams": {"catalog": {"base_url": upstream.url}},
            }
        )
    )

    async def page(request: Request) -> PlainTextResponse:
        async with guard.async_client("catalog") as client:
            response = await client.get("/items")
        return PlainTextResponse(response.text)

    async def logo(request: Request) -> Response:
        return Response(LOGO, media_type="image/svg+xml")

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)  # as a real site has one: no 404 in the console

    routes = [Route("/items", page), Route("/static/logo.svg", logo)]
    app = Starlette(routes=[*routes, Route("/favicon.ico", favicon)])
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    with serve_asgi(app) as url:
        yield url


@pytest.mark.parametrize(
    ("language", "lang", "dir_", "heading"),
    [
        ("en-US,en;q=0.9", "en", "ltr", "Something went wrong on our side"),
        ("de-DE,de;q=0.9,en;q=0.8", "de", "ltr", "Bei uns ist etwas schiefgelaufen"),
        ("ja,en-US;q=0.9", "ja", "ltr", "こちら側で問題が発生しました"),
        ("ar-EG,ar;q=0.9,en;q=0.5", "ar", "rtl", "حدث خطأ من جهتنا"),
    ],
    ids=["en", "de", "ja", "ar"],
)
def test_error_page_in_the_visitors_language(
    browser: Browser,
    branded_site: str,
    upstream: MisbehavingUpstream,
    language: str,
    lang: str,
    dir_: str,
    heading: str,
) -> None:
    # A 503 with Retry-After from the upstream, retries spent: a 502 that knows the wait.
    upstream.set_mode("status", status=503, retry_after="30")
    url = f"{branded_site}/items"
    page = browser.check(url, f"error-502-{lang}", headers={"Accept-Language": language})
    assert (page.lang, page.dir) == (lang, dir_)
    assert heading in page.text
    assert "Acme Shop" in page.title
    driver = browser.driver
    # The logo loaded (the CSP lets it), with the brand's name as its text alternative.
    logo = driver.find_element("css selector", ".brand img")
    assert logo.get_attribute("alt") == "Acme Shop"
    assert driver.execute_script("return arguments[0].naturalWidth", logo) > 0
    # The countdown is visible and counts down, in CSS alone (the page runs no script).
    countdown = driver.find_element("css selector", ".countdown-wait")
    assert countdown.is_displayed()
    clock = driver.find_element("css selector", ".countdown-clock")

    def left() -> int:
        value = driver.execute_script(
            "return getComputedStyle(arguments[0]).getPropertyValue('--gg-left')", clock
        )
        return int(str(value).strip())

    first = left()
    assert 27 <= first <= 30, first
    time.sleep(1.6)
    assert left() < first
    minutes, seconds = (
        int(
            str(
                driver.execute_script(
                    f"return getComputedStyle(arguments[0]).getPropertyValue('--gg-{part}')", clock
                )
            ).strip()
        )
        for part in ("min", "sec")
    )
    assert minutes == 0 and 0 < seconds < 30
    assert not driver.find_element("css selector", ".countdown-done").is_displayed()
    # The way back to the site.
    home = driver.find_element("css selector", '.actions a[href="/"]')
    assert home.is_displayed()


def test_each_client_gets_the_body_it_can_read(
    browser: Browser, branded_site: str, upstream: MisbehavingUpstream
) -> None:
    """fetch() and XHR from a real page, a real navigation, and curl's requests: the media
    type each is answered with, written to test-artifacts/browser/media-types.md."""
    upstream.set_mode("refuse")
    driver = browser.driver
    url = f"{branded_site}/items"
    browser.open(f"{branded_site}/static/logo.svg")  # a page of the same origin to script from
    fetched = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => done([r.status, r.headers.get('content-type')]))"
        ".catch(e => done(['error', String(e)]));",
        url,
    )
    xhr = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const x = new XMLHttpRequest(); x.open('GET', arguments[0]);"
        "x.onload = () => done([x.status, x.getResponseHeader('content-type')]);"
        "x.onerror = () => done(['error', 'xhr']); x.send();",
        url,
    )
    browser.open(url)
    navigated = driver.execute_script(
        "return [performance.getEntriesByType('navigation')[0].responseStatus,"
        " document.contentType]"
    )

    def curl(*args: str) -> list[Any]:
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{content_type}", *args, url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        status, _, content_type = out.partition(" ")
        return [int(status), content_type]

    rows = {
        "fetch() (Chromium)": fetched,
        "XMLHttpRequest (Chromium)": xhr,
        "browser navigation (Chromium)": navigated,
        "curl": curl(),
        "Accept: application/vnd.api+json": curl("-H", "Accept: application/vnd.api+json"),
        "Accept: application/xml": curl("-H", "Accept: application/xml"),
        "HEAD (curl -I)": curl("-I"),
        "HEAD, Accept: application/json": curl("-I", "-H", "Accept: application/json"),
    }
    table = ["| client | status | Content-Type |", "|---|---|---|"]
    table += [f"| {client} | {status} | `{ctype}` |" for client, (status, ctype) in rows.items()]
    (artifacts_dir() / "media-types.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    problem, page, text = "application/problem+json", "text/html", "text/plain; charset=utf-8"
    assert fetched == [502, problem] and xhr == [502, problem], table
    assert navigated == [502, page], table
    assert rows["curl"] == [502, text]
    assert rows["Accept: application/vnd.api+json"] == [502, problem]
    assert rows["Accept: application/xml"] == [502, text]
    assert rows["HEAD (curl -I)"] == [502, text]
    assert rows["HEAD, Accept: application/json"] == [502, problem]
