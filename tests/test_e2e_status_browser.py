"""The status page in a real browser (#14): headless Chromium, screenshots, console, axe-core.

End to end: a visitor's error page shows a reference; the operator finds its record on the
status page; a force-open clicked without the token changes nothing; with the token the
breaker opens and the next call is rejected without reaching the upstream.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import gateway_guard as gg
from browser import Browser, chromium
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_asgi

pytestmark = pytest.mark.e2e

TOKEN = "browser-status-token-0123456789"
STATUS = "/_gateway_guard"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def site(upstream: MisbehavingUpstream) -> Iterator[str]:
    guard = gg.Guard(
        {
            "service": "shop",
            "brand": {"name": "Acme Shop", "accent_color": "#5b21b6"},
            "defaults": {"retry": {"attempts": 1}, "connect_timeout": 0.5},
            "upstreams": {"payments": {"base_url": upstream.url}},
            "routes": [{"path": "/orders/{id}", "name": "orders"}],
            "status": {"path": STATUS, "token": TOKEN},
        }
    )

    async def order(request: Request) -> PlainTextResponse:
        async with guard.async_client("payments") as payments:
            response = await payments.get("/charge")
        return PlainTextResponse(response.text)

    app = Starlette(routes=[Route("/orders/{id}", order)])
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    with serve_asgi(app) as url:
        yield url


def _wait(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _click(browser: Browser, selector: str) -> None:
    """Click, again if the page's refresh replaced the element meanwhile (every 5 s)."""

    def clicked() -> bool:
        try:
            browser.driver.find_element("css selector", selector).click()
        except Exception:  # not rendered yet, or replaced by a refresh
            return False
        return True

    _wait(clicked, f"a click on {selector}")


def _text(browser: Browser, element_id: str) -> str:
    return str(browser.driver.find_element("id", element_id).text)


def test_status_page_in_chromium(
    browser: Browser, site: str, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("refuse")
    page = browser.check(f"{site}/orders/1", "status-error-page-502")
    [reference] = set(re.findall(r"\b[0-9a-f]{32}\b", page.text))

    page = browser.check(f"{site}{STATUS}", "status-page")
    assert page.title == "Acme Shop \u2014 gateway status"
    assert page.lang == "en"
    # Once the data is in, the page is still clean for axe, at both widths.
    for size in ((1280, 800), (390, 844)):
        browser.open(f"{site}{STATUS}", size=size)
        _wait(lambda: "payments" in _text(browser, "upstreams"), "the upstream row")
        _wait(lambda: reference in _text(browser, "errors"), "the recent error")
        # Behind several workers each answer is one worker's: the page says whose.
        scope = _text(browser, "scope")
        assert f"this process's (pid {os.getpid()}) only" in scope, scope
        assert "(this process)" in _text(browser, "errors-h")
        assert browser.console_errors(f"{site}{STATUS}") == []
        assert browser.axe_violations() == []
        browser.screenshot(f"status-page-data-{size[0]}w")

    # The reference the visitor quoted finds its record.
    browser.open(f"{site}{STATUS}/errors/{reference}")
    record = _wait(lambda: _text(browser, "record"), "the record")
    assert f'"reference": "{reference}"' in record
    assert '"upstream": "payments"' in record and '"route": "orders"' in record
    assert '"proxy_error": "connection_refused"' in record
    browser.screenshot("status-page-record")


def test_force_open_from_the_page_needs_the_token(
    browser: Browser, site: str, upstream: MisbehavingUpstream
) -> None:
    def state() -> str:
        data = httpx.get(f"{site}{STATUS}", headers={"Accept": "application/json"}).json()
        return str(data["upstreams"]["payments"]["state"])

    browser.open(f"{site}{STATUS}")
    _click(browser, "button[aria-label='force-open payments']")
    _wait(lambda: "refused (401)" in _text(browser, "message"), "the refusal")
    assert state() == "closed"
    assert httpx.get(f"{site}/orders/1").status_code == 200

    browser.driver.find_element("id", "token").send_keys(TOKEN)
    browser.driver.find_element("css selector", "#token-form button").click()
    _wait(lambda: "Token kept" in _text(browser, "message"), "the token")
    _click(browser, "button[aria-label='force-open payments']")
    _wait(lambda: "force-open payments: done" in _text(browser, "message"), "the action")
    _wait(lambda: "forced open" in _text(browser, "upstreams"), "the new state")
    browser.screenshot("status-page-forced-open")
    assert state() == "forced_open"

    before = upstream.stats().requests
    rejected = httpx.get(f"{site}/orders/2", headers={"Accept": "application/json"})
    assert rejected.status_code == 503
    assert "destination_unavailable" in rejected.headers["proxy-status"]
    assert upstream.stats().requests == before
