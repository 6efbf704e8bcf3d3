"""The error pages in a real browser: headless Chromium, screenshots, console, axe-core.

A Starlette app behind the middleware calls the misbehaving upstream, which is made to
fail three ways (a 503 with Retry-After, a refused connection, a hang), so that the visitor
sees the 503, 502 and 504 pages exactly as a browser navigation receives them. Each page is
opened at desktop and phone widths; screenshots land in test-artifacts/browser/.
"""

from __future__ import annotations

from collections.abc import Iterator

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
