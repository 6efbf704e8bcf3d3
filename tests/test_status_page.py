"""The status page and the health endpoint (#14), served by every adapter.

Real servers (uvicorn for ASGI; cheroot for WSGI, Flask and Django), the misbehaving
upstream, real breakers. A request "from another host" is one with a forwarding header:
the servers here listen on loopback only.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard.testing import MisbehavingUpstream
from servers import serve_asgi, serve_wsgi

TOKEN = "s3cret-status-token-0123456789"
STATUS = "/_gateway_guard"
BREAKER = {"min_calls": 2, "window_size": 4, "failure_rate": 0.5, "open_seconds": 30.0}
ADAPTERS = ["asgi", "wsgi", "flask", "django"]


def settings_for(up: MisbehavingUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "service": "shop",
        "brand": {"name": "Acme Shop"},
        "defaults": {"retry": {"attempts": 1}, "breaker": BREAKER},
        "upstreams": {"payments": {"base_url": up.url}},
        "routes": [{"path": "/orders/{id}", "name": "orders"}],
        "status": {"path": STATUS, "token": TOKEN},
        "health": {"path": "/healthz"},
        **extra,
    }


def _asgi(guard: gg.Guard) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with guard.async_client("payments") as payments:
            await payments.get("/charge")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return gg.GatewayGuardMiddleware(app, guard=guard)


def _wsgi(guard: gg.Guard) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with guard.client("payments") as payments:
            payments.get("/charge")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return gg.GatewayGuardWSGI(app, guard=guard)


def _flask(settings: dict[str, Any]) -> Any:
    from flask import Flask

    from gateway_guard.flask import GatewayGuard

    app = Flask("status_page_test")
    ext = GatewayGuard(app, settings=settings)

    @app.get("/orders/<order_id>")
    def order(order_id: str) -> str:
        with ext.guard.client("payments") as payments:
            payments.get("/charge")
        return "ok"

    return app


def _django_view(request: Any, order_id: str) -> Any:
    from django.http import HttpResponse

    from gateway_guard.django import get_guard

    with get_guard().client("payments") as payments:
        payments.get("/charge")
    return HttpResponse("ok")


def _urlpatterns() -> list[Any]:
    from django.urls import path

    return [path("orders/<str:order_id>", _django_view)]


@contextmanager
def stack(kind: str, settings: dict[str, Any]) -> Iterator[tuple[str, gg.Guard]]:
    """The app under ``kind``'s adapter and a real server; yields (base URL, its Guard)."""
    if kind == "asgi":
        guard = gg.Guard(settings)
        with serve_asgi(_asgi(guard)) as url:
            yield url, guard
    elif kind == "wsgi":
        guard = gg.Guard(settings)
        with serve_wsgi(_wsgi(guard)) as url:
            yield url, guard
    elif kind == "flask":
        app = _flask(settings)
        from gateway_guard.flask import get_guard

        with serve_wsgi(app) as url:
            yield url, get_guard(app)
    else:
        from django.core.handlers.wsgi import WSGIHandler
        from django.test import override_settings

        import django_setup  # noqa: F401 - configures Django once for the process
        from gateway_guard.django import get_guard as django_guard

        with (
            override_settings(
                MIDDLEWARE=["gateway_guard.django.GatewayGuardMiddleware"],
                ROOT_URLCONF="test_status_page",
                GATEWAY_GUARD=settings,
            ),
            serve_wsgi(WSGIHandler()) as url,
        ):
            yield url, django_guard()


urlpatterns = _urlpatterns()

JSON = {"Accept": "application/json"}
REMOTE = {**JSON, "X-Forwarded-For": "203.0.113.9"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


# --- health -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_health_answers_ok_for_get_and_head_only(kind: str, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("refuse")  # a down upstream is no reason to restart the process
    with stack(kind, settings_for(upstream)) as (url, _):
        got = httpx.get(f"{url}/healthz")
        head = httpx.head(f"{url}/healthz")
        post = httpx.post(f"{url}/healthz")
    assert got.status_code == 200
    assert got.json() == {"status": "ok", "service": "shop"}
    assert got.headers["cache-control"] == "no-store"
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_our_endpoints_are_never_shed(upstream: MisbehavingUpstream) -> None:
    settings = settings_for(upstream, shed={"max_concurrent": 1, "max_queue": 0})
    inside, release = threading.Event(), threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inside.set()
        release.wait(10)
        start_response("200 OK", [])
        return [b"ok"]

    guard = gg.Guard(settings)
    with serve_wsgi(gg.GatewayGuardWSGI(app, guard=guard)) as url:
        holder = threading.Thread(target=httpx.get, args=(f"{url}/orders/1",))
        holder.start()
        try:
            assert inside.wait(10)
            shed = httpx.get(f"{url}/orders/2")
            health = httpx.get(f"{url}/healthz")
            status = httpx.get(f"{url}{STATUS}", headers=JSON)
        finally:
            release.set()
            holder.join(10)
    assert shed.status_code == 503
    assert health.status_code == 200
    assert status.status_code == 200
    assert status.json()["routes"]["*"]["in_flight"] == 1


# --- reading the page -------------------------------------------------------------------------


def _open_the_breaker(url: str) -> list[httpx.Response]:
    responses = []
    for n in range(6):
        response = httpx.get(f"{url}/orders/{n}", headers=JSON)
        responses.append(response)
        if "destination_unavailable" in response.headers.get("proxy-status", ""):
            break
    return responses


@pytest.mark.parametrize("kind", ADAPTERS)
def test_status_json_shows_the_open_breaker_and_finds_a_quoted_reference(
    kind: str, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("refuse")
    with stack(kind, settings_for(upstream)) as (url, _):
        responses = _open_the_breaker(url)
        data = httpx.get(f"{url}{STATUS}", headers=JSON).json()
        first = responses[0]
        reference = first.headers["x-request-id"]
        record = httpx.get(f"{url}{STATUS}/errors/{reference}", headers=JSON)
        unknown = httpx.get(f"{url}{STATUS}/errors/not-a-reference", headers=JSON)
        head = httpx.head(f"{url}{STATUS}", headers=JSON)
    assert first.status_code == 502
    assert data["service"] == "shop"
    assert data["backend"] == "local"
    payments = data["upstreams"]["payments"]
    assert payments["state"] == "open"
    assert payments["failure_rate"] == 1.0
    assert payments["calls"] >= 2
    assert 0 < payments["half_open_in"] <= 30
    assert payments["bulkhead"] == {"in_flight": 0, "limit": 100, "queued": 0, "rejected": 0}
    assert payments["retry_budget"]["left"] >= 0
    assert data["routes"]["*"]["in_flight"] == 0
    # Production-safe: no upstream address anywhere without debug.
    assert "base_url" not in payments
    assert upstream.url.removeprefix("http://") not in str(data)
    assert [e["reference"] for e in data["recent_errors"]][-1] == reference
    assert record.status_code == 200
    found = record.json()
    assert found["reference"] == reference
    assert (found["upstream"], found["route"], found["status"]) == ("payments", "orders", 502)
    assert found["proxy_error"] == "connection_refused"
    assert found["attempts"] == 1
    assert found["elapsed"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", found["time"])
    assert unknown.status_code == 404
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("kind", ["asgi", "django"])
def test_reads_from_another_host_need_the_token(kind: str, upstream: MisbehavingUpstream) -> None:
    with stack(kind, settings_for(upstream)) as (url, _):
        without = httpx.get(f"{url}{STATUS}", headers=REMOTE)
        wrong = httpx.get(f"{url}{STATUS}", headers={**REMOTE, "Authorization": "Bearer nope"})
        cookie = httpx.get(f"{url}{STATUS}", headers={**REMOTE, "Cookie": f"token={TOKEN}"})
        right = httpx.get(f"{url}{STATUS}", headers={**REMOTE, **BEARER})
        page = httpx.get(f"{url}{STATUS}", headers={**REMOTE, "Accept": "text/html"})
    assert without.status_code == 401
    assert without.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert cookie.status_code == 401
    assert right.status_code == 200 and "payments" in right.json()["upstreams"]
    # The HTML shell holds no data: served to anyone; its script asks for the token.
    assert page.status_code == 200 and "payments" not in page.text


def test_without_a_token_reads_are_loopback_only_and_actions_refused(
    upstream: MisbehavingUpstream,
) -> None:
    settings = settings_for(upstream, status={"path": STATUS})
    with stack("wsgi", settings) as (url, guard):
        local = httpx.get(f"{url}{STATUS}", headers=JSON)
        remote = httpx.get(f"{url}{STATUS}", headers=REMOTE)
        action = httpx.post(f"{url}{STATUS}/upstreams/payments/force-open", headers=BEARER)
        state = guard.breaker("payments").state
    assert local.status_code == 200
    assert remote.status_code == 403
    assert action.status_code == 403
    assert state is gg.BreakerState.CLOSED


# --- actions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_force_open_needs_the_token_and_then_opens_the_breaker(
    kind: str, upstream: MisbehavingUpstream
) -> None:
    force_open = f"{STATUS}/upstreams/payments/force-open"
    with stack(kind, settings_for(upstream)) as (url, guard):
        refused = [
            httpx.post(f"{url}{force_open}"),
            httpx.post(f"{url}{force_open}", headers={"Authorization": "Bearer wrong-token"}),
            httpx.post(f"{url}{force_open}", headers={"Authorization": f"Basic {TOKEN}"}),
            httpx.post(f"{url}{force_open}", headers={"Cookie": f"token={TOKEN}"}),
        ]
        unchanged = guard.breaker("payments").state
        still_served = httpx.get(f"{url}/orders/1")
        done = httpx.post(f"{url}{force_open}", headers=BEARER)
        rejected = httpx.get(f"{url}/orders/2", headers=JSON)
        reset = httpx.post(f"{url}{STATUS}/upstreams/payments/reset", headers=BEARER)
        after_reset = httpx.get(f"{url}/orders/3")
        unknown = httpx.post(f"{url}{STATUS}/upstreams/nope/force-open", headers=BEARER)
        bad_action = httpx.post(f"{url}{STATUS}/upstreams/payments/explode", headers=BEARER)
    assert [r.status_code for r in refused] == [401, 401, 401, 401]
    assert unchanged is gg.BreakerState.CLOSED
    assert still_served.status_code == 200
    assert done.status_code == 200
    assert done.json() == {"upstream": "payments", "action": "force-open", "state": "forced_open"}
    assert rejected.status_code == 503
    assert "destination_unavailable" in rejected.headers["proxy-status"]
    assert upstream.stats().requests == 2  # the rejected call never reached it
    assert reset.json()["state"] == "closed"
    assert after_reset.status_code == 200
    assert unknown.status_code == 404
    assert bad_action.status_code == 404


def test_every_action_drives_the_breaker(upstream: MisbehavingUpstream) -> None:
    with stack("asgi", settings_for(upstream)) as (url, guard):
        states = {}
        for action in ("force-open", "force-closed", "disable", "reset"):
            response = httpx.post(f"{url}{STATUS}/upstreams/payments/{action}", headers=BEARER)
            states[action] = (response.json()["state"], guard.breaker("payments").state.value)
    assert states == {
        "force-open": ("forced_open", "forced_open"),
        "force-closed": ("closed", "closed"),
        "disable": ("disabled", "disabled"),
        "reset": ("closed", "closed"),
    }


# --- the HTML page ----------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_self_contained_and_its_csp_allows_exactly_its_inline_code(
    upstream: MisbehavingUpstream,
) -> None:
    with stack("asgi", settings_for(upstream)) as (url, _):
        page = httpx.get(f"{url}{STATUS}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    [style] = re.findall(r"<style>(.*?)</style>", page.text, re.DOTALL)
    [script] = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    assert f"style-src {_sha256(style)};" in csp
    assert f"script-src {_sha256(script)};" in csp
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert not re.search(r"""(src|href)=["']?https?:""", page.text)
    assert "<title>Acme Shop \u2014 gateway status</title>" in page.text
    assert 'http-equiv="refresh"' not in page.text


def test_settings_are_checked_at_startup() -> None:
    with pytest.raises(gg.SettingsError, match=r"status\.path"):
        gg.Guard({"status": {"path": "no-slash"}})
    with pytest.raises(gg.SettingsError, match=r"status\.token"):
        gg.Guard({"status": {"path": STATUS, "token": "short"}})
    with pytest.raises(gg.SettingsError, match=r"health\.path"):
        gg.Guard({"health": {"path": "/"}})
    assert gg.Guard({}).endpoints is None  # nothing configured: nothing on the request path


def test_django_async_serves_the_endpoints(upstream: MisbehavingUpstream) -> None:
    import asyncio

    from django.test import AsyncClient, override_settings

    import django_setup  # noqa: F401 - configures Django once for the process

    with override_settings(
        MIDDLEWARE=["gateway_guard.django.GatewayGuardMiddleware"],
        ROOT_URLCONF="test_status_page",
        GATEWAY_GUARD=settings_for(upstream),
    ):
        client = AsyncClient()
        health = asyncio.run(client.get("/healthz"))
        status = asyncio.run(client.get(STATUS, headers=JSON))
        remote = asyncio.run(client.get(STATUS, headers=REMOTE))
        action = asyncio.run(client.post(f"{STATUS}/upstreams/payments/force-open"))
    assert health.status_code == 200
    assert status.status_code == 200  # the test client's REMOTE_ADDR is 127.0.0.1
    assert remote.status_code == 401
    assert action.status_code == 401
