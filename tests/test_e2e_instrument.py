"""Instrumentation end to end: an app's own clients, guarded for real by a setting.

A FastAPI app under uvicorn and a Flask app under cheroot, each with ``instrument =
["httpx", "requests", "aiohttp"]`` in its settings, call the misbehaving upstream through
``PaymentsSDK`` (its own httpx clients, knowing nothing of gateway_guard); a Flask app calls
``requests.request`` directly, and a FastAPI app a plain ``aiohttp.ClientSession``. Every failure mode gives the branded status, Proxy-Status
and X-Request-ID; a POST without an Idempotency-Key reaches the upstream once; a hung
upstream gives a 504 within the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import fastapi
import flask
import httpx
import pytest

import gateway_guard as gg
from gateway_guard.flask import GatewayGuard
from gateway_guard.testing import MisbehavingUpstream
from servers import serve_asgi, serve_wsgi

WAIT = 15.0
DEADLINE = 1.5


class PaymentsSDK:
    """What a vendor SDK looks like: its own httpx clients, its own base URL, no guard."""

    def __init__(self, base_url: str) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=30.0)
        self._async = httpx.AsyncClient(base_url=base_url, timeout=30.0)

    def charge(self, method: str) -> dict[str, Any]:
        response = self._http.request(method, "/charges", json={"amount": 5})
        return {"status": response.status_code}

    async def acharge(self, method: str) -> dict[str, Any]:
        response = await self._async.request(method, "/charges", json={"amount": 5})
        return {"status": response.status_code}


def settings_for(up: MisbehavingUpstream) -> dict[str, Any]:
    host = up.url.split("://")[1]
    return {
        "service": "shop",
        "instrument": ["httpx", "requests", "aiohttp"],
        "defaults": {
            "read_timeout": 0.5,
            "deadline": DEADLINE,
            "retry": {"attempts": 3, "backoff_initial": 0.0, "jitter": False},
            "breaker": {"min_calls": 1000, "window_size": 1000, "consecutive_timeouts": 0},
        },
        # The SDK is configured with the host; the upstream is known by it.
        "upstreams": {"payments": {"match": [host]}},
    }


def fastapi_app(up: MisbehavingUpstream) -> Any:
    sdk = PaymentsSDK(up.url)
    app = fastapi.FastAPI()
    app.add_middleware(gg.GatewayGuardMiddleware, settings=settings_for(up))

    @app.api_route("/pay", methods=["GET", "POST"])
    async def pay(request: fastapi.Request) -> dict[str, Any]:
        return await sdk.acharge(request.method)

    @app.api_route("/pay-sync", methods=["GET", "POST"])
    def pay_sync(request: fastapi.Request) -> dict[str, Any]:
        return sdk.charge(request.method)

    return app


def flask_app(up: MisbehavingUpstream) -> Any:
    sdk = PaymentsSDK(up.url)
    app = flask.Flask("shop")
    app.config["GATEWAY_GUARD"] = settings_for(up)
    GatewayGuard(app)

    @app.route("/pay", methods=["GET", "POST"])
    def pay() -> dict[str, Any]:
        return sdk.charge(flask.request.method)

    @app.route("/pay-sync", methods=["GET", "POST"])
    def pay_sync() -> dict[str, Any]:
        return sdk.charge(flask.request.method)

    return app


def flask_requests_app(up: MisbehavingUpstream) -> Any:
    """The common Flask code: ``requests`` called directly, no gateway_guard in sight."""
    import requests

    app = flask.Flask("shop")
    app.config["GATEWAY_GUARD"] = settings_for(up)
    GatewayGuard(app)

    @app.route("/pay", methods=["GET", "POST"])
    @app.route("/pay-sync", methods=["GET", "POST"])
    def pay() -> dict[str, Any]:
        response = requests.request(flask.request.method, up.url + "/charges", timeout=30)
        return {"status": response.status_code}

    return app


def fastapi_aiohttp_app(up: MisbehavingUpstream) -> Any:
    import aiohttp

    app = fastapi.FastAPI()
    app.add_middleware(gg.GatewayGuardMiddleware, settings=settings_for(up))

    @app.api_route("/pay", methods=["GET", "POST"])
    @app.api_route("/pay-sync", methods=["GET", "POST"])
    async def pay(request: fastapi.Request) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, up.url + "/charges") as response,
        ):
            await response.read()  # as requests and httpx do before they return
            return {"status": response.status}

    return app


@pytest.fixture(params=["fastapi", "flask", "flask-requests", "fastapi-aiohttp"])
def served(request: pytest.FixtureRequest, upstream: MisbehavingUpstream) -> Iterator[str]:
    gg.uninstrument()
    try:
        if request.param == "fastapi":
            with serve_asgi(fastapi_app(upstream)) as url:
                yield url
        elif request.param == "fastapi-aiohttp":
            with serve_asgi(fastapi_aiohttp_app(upstream)) as url:
                yield url
        elif request.param == "flask-requests":
            with serve_wsgi(flask_requests_app(upstream)) as url:
                yield url
        else:
            with serve_wsgi(flask_app(upstream)) as url:
                yield url
    finally:
        gg.uninstrument()


FAILURES = {
    "status": ({"mode": "status", "status": 503}, 502, "received-status=503"),
    "refuse": ({"mode": "refuse"}, 502, "connection_refused"),
    "reset": ({"mode": "reset"}, 502, "connection_terminated"),
    "garbage": ({"mode": "garbage"}, 502, "http_protocol_error"),
    "truncated": ({"mode": "truncated"}, 502, "http_response_incomplete"),
    "hang": ({"mode": "hang"}, 504, "timeout"),
}


def test_a_healthy_upstream_answers_through_the_sdk(
    served: str, upstream: MisbehavingUpstream
) -> None:
    for path in ("/pay", "/pay-sync"):
        response = httpx.get(served + path, timeout=WAIT)
        assert response.json() == {"status": 200}
        assert response.headers["x-request-id"]


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_every_failure_is_branded(served: str, upstream: MisbehavingUpstream, failure: str) -> None:
    options, status, proxy = FAILURES[failure]
    upstream.set_mode(**options)
    for path in ("/pay", "/pay-sync"):
        started = time.monotonic()
        response = httpx.get(
            served + path,
            headers={"accept": "application/json", "x-request-id": f"rid-{failure}"},
            timeout=WAIT,
        )
        took = time.monotonic() - started
        assert response.status_code == status, response.text
        assert response.headers["x-request-id"] == f"rid-{failure}"
        assert response.headers["proxy-status"].startswith("shop;")
        assert proxy in response.headers["proxy-status"]
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == status
        assert str(upstream.port) not in response.text  # no upstream detail leaks
        # The deadline bounds every failure, a hang included.
        assert took < DEADLINE + 1.0


def test_post_without_idempotency_key_reaches_the_upstream_once(
    served: str, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("status", status=503)
    for path in ("/pay", "/pay-sync"):
        upstream.reset_stats()
        response = httpx.post(served + path, timeout=WAIT)
        assert response.status_code == 502
        assert upstream.stats().requests == 1
    upstream.reset_stats()
    assert httpx.get(served + "/pay", timeout=WAIT).status_code == 502
    assert upstream.stats().requests == 3  # a GET is retried
