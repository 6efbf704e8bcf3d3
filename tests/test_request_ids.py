"""Request ids owned by another library (#14): asgi-correlation-id and django-guid.

Whichever order the middlewares are stacked in, the request has ONE id: the app's log
lines, ``current_context().request_id``, the id sent to the upstream and the response's
single ``X-Request-ID`` all agree. Real stacks under real servers (uvicorn, cheroot).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from asgi_correlation_id import CorrelationIdMiddleware
from asgi_correlation_id.context import correlation_id
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import gateway_guard as gg
from gateway_guard.log import RequestContextFilter
from gateway_guard.testing import MisbehavingUpstream
from servers import serve_asgi, serve_wsgi

# --- asgi-correlation-id ----------------------------------------------------------------------


def _starlette(up: MisbehavingUpstream, order: str) -> Starlette:
    guard = gg.Guard({"upstreams": {"payments": {"base_url": up.url, "retry": {"attempts": 1}}}})

    async def ids(request: Request) -> JSONResponse:
        logging.getLogger("shop").info("serving")
        async with guard.async_client("payments") as payments:
            echoed = (await payments.get("/echo")).json()["headers"].get("x-request-id")
        ctx = gg.current_context()
        assert ctx is not None
        return JSONResponse(
            {"theirs": correlation_id.get(), "ours": ctx.request_id, "upstream": echoed}
        )

    app = Starlette(routes=[Route("/ids", ids)])
    # add_middleware: the last added is the outermost.
    if order == "theirs-outside":
        app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
        app.add_middleware(CorrelationIdMiddleware)
    else:
        app.add_middleware(CorrelationIdMiddleware)
        app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    return app


ORDERS = ["theirs-outside", "theirs-inside"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sent", [None, "0123456789abcdef0123456789abcdef"])
def test_asgi_correlation_id_one_id_one_header(
    order: str,
    sent: str | None,
    upstream: MisbehavingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request_filter = RequestContextFilter()
    caplog.handler.addFilter(request_filter)
    caplog.set_level(logging.INFO, logger="shop")
    headers = {"X-Request-ID": sent} if sent else {}
    try:
        with serve_asgi(_starlette(upstream, order)) as url:
            response = httpx.get(f"{url}/ids", headers=headers)
    finally:
        caplog.handler.removeFilter(request_filter)
    assert response.status_code == 200
    assert len(response.headers.get_list("x-request-id")) == 1, response.headers
    rid = response.headers["x-request-id"]
    body = response.json()
    assert body["theirs"] == body["ours"] == body["upstream"] == rid
    if sent:
        assert rid == sent
    [record] = [r for r in caplog.records if r.name == "shop"]
    assert record.request_id == rid  # type: ignore[attr-defined]


def test_asgi_correlation_id_inside_us_gets_our_id_in_place_of_a_bad_one(
    upstream: MisbehavingUpstream,
) -> None:
    # The request's own X-Request-ID is not one we echo: the library inside us must read
    # ours instead of it (not beside it), or it would keep the bad one or make a third.
    with serve_asgi(_starlette(upstream, "theirs-inside")) as url:
        response = httpx.get(f"{url}/ids", headers={"X-Request-ID": "not (a valid) id"})
    assert response.status_code == 200
    assert len(response.headers.get_list("x-request-id")) == 1, response.headers
    rid = response.headers["x-request-id"]
    body = response.json()
    assert body["theirs"] == body["ours"] == body["upstream"] == rid != "not (a valid) id"


@pytest.mark.parametrize("order", ORDERS)
def test_asgi_correlation_id_on_our_error_page(
    order: str, upstream: MisbehavingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    upstream.set_mode("refuse")
    with serve_asgi(_starlette(upstream, order)) as url:
        response = httpx.get(f"{url}/ids", headers={"Accept": "application/json"})
    assert response.status_code == 502
    assert len(response.headers.get_list("x-request-id")) == 1, response.headers
    rid = response.headers["x-request-id"]
    assert response.json()["instance"] == f"urn:request:{rid}"  # the reference quoted
    [line] = [r for r in caplog.records if "gateway error" in r.msg]
    assert line.request_id == rid  # type: ignore[attr-defined]


def test_no_id_library_costs_nothing_and_changes_nothing(upstream: MisbehavingUpstream) -> None:
    guard = gg.Guard({"upstreams": {"payments": {"base_url": upstream.url}}})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        # No id library outside us: the scope is the server's, with no header added.
        assert all(name != b"x-request-id" for name, _ in scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    saved = sys.modules.pop("asgi_correlation_id.context")
    try:
        with serve_asgi(gg.GatewayGuardMiddleware(app, guard=guard)) as url:
            response = httpx.get(url)
    finally:
        sys.modules["asgi_correlation_id.context"] = saved
    assert response.status_code == 200
    assert len(response.headers.get_list("x-request-id")) == 1


# --- django-guid ------------------------------------------------------------------------------

GUID = "django_guid.middleware.guid_middleware"
OURS = "gateway_guard.django.GatewayGuardMiddleware"


@contextmanager
def _django(order: str, up: MisbehavingUpstream) -> Iterator[str]:
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    import django_setup  # noqa: F401 - configures Django once for the process

    stack = [GUID, OURS] if order == "theirs-outside" else [OURS, GUID]
    with (
        override_settings(
            INSTALLED_APPS=["gateway_guard.django", "django_guid"],
            MIDDLEWARE=stack,
            ROOT_URLCONF="test_request_ids",
            GATEWAY_GUARD={
                "upstreams": {"up": {"base_url": up.url, "retry": {"attempts": 1}}},
            },
        ),
        serve_wsgi(WSGIHandler()) as url,
    ):
        yield url


def _django_view(request: Any) -> Any:
    from django.http import JsonResponse
    from django_guid import get_guid

    from gateway_guard.django import get_guard

    with get_guard().client("up") as client:
        echoed = client.get("/echo").json()["headers"].get("x-request-id")
    ctx = gg.current_context()
    assert ctx is not None
    return JsonResponse({"theirs": get_guid(), "ours": ctx.request_id, "upstream": echoed})


def _urlpatterns() -> list[Any]:
    try:
        from django.urls import path
    except ImportError:  # pragma: no cover - django is a dev dependency
        return []
    return [path("ids", _django_view)]


urlpatterns = _urlpatterns()


@pytest.mark.parametrize("order", ORDERS)
def test_django_guid_one_id(order: str, upstream: MisbehavingUpstream) -> None:
    with _django(order, upstream) as url:
        first = httpx.get(f"{url}/ids")
        second = httpx.get(f"{url}/ids")
        upstream.set_mode("refuse")
        failed = httpx.get(f"{url}/ids", headers={"Accept": "application/json"})
    for response in (first, second):
        assert response.status_code == 200, response.text
        assert len(response.headers.get_list("x-request-id")) == 1
        body = json.loads(response.text)
        assert (
            body["theirs"] == body["ours"] == body["upstream"] == response.headers["x-request-id"]
        )
        assert response.headers["correlation-id"] == body["ours"]
    # Two requests, two ids: a thread's context must not hand the first to the second.
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert failed.status_code == 502
    assert len(failed.headers.get_list("x-request-id")) == 1
    assert failed.json()["instance"] == "urn:request:" + failed.headers["x-request-id"]
