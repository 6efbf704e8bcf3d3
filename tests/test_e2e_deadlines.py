"""End to end: deadlines are wall-clock bounds, whatever the upstream's pacing.

The misbehaving upstream drips its head a header line at a time, or its body a byte at a
time, every 0.25 s: each read finishes well inside any read timeout, so only the deadline
can stop the call. Real servers (uvicorn, cheroot), real guarded httpx clients (sync and
async), real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import gateway_guard as gg
from gateway_guard.testing.upstream import MisbehavingUpstream, Mode
from servers import serve_asgi, serve_wsgi

pytestmark = pytest.mark.e2e

WAIT = 10.0
DRIP_MS = 250.0
ROUTE_DEADLINE = 1.0
# The bound for a 1 s route deadline: the answer within 1.2 s.
ANSWER_WITHIN = 1.2
# Per-read timeouts far longer than a drip interval, and a call deadline far longer than
# the route's: only the route's deadline, as a wall-clock bound, ends these calls.
DEFAULTS = {
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "deadline": 30.0,
    "retry": {"attempts": 3},
    "breaker": {"min_calls": 1000, "window_size": 1000},
}
DRIPS = {
    "headers": {"mode": Mode.DRIP_HEADERS, "drip_ms": DRIP_MS},
    "body": {"mode": Mode.DRIP_BODY, "drip_ms": DRIP_MS},
    "failure-body": {"mode": Mode.DRIP_BODY, "drip_ms": DRIP_MS, "drip_status": 503},
}


# --- the apps: one route with a 1 s deadline, calling the upstream by a sync or async client --


def _echo(response: httpx.Response) -> dict[str, Any]:
    return {"status": response.status_code, "length": len(response.content)}


async def _async_call(request: Request) -> JSONResponse:
    async with gg.current_guard().async_client("up") as client:
        return JSONResponse(_echo(await client.get("/data")))


def _sync_call(request: Request) -> JSONResponse:
    # A sync endpoint: Starlette runs it in its thread pool, with the request's context.
    with gg.current_guard().client("up") as client:
        return JSONResponse(_echo(client.get("/data")))


def starlette_app(guard: gg.Guard) -> Starlette:
    app = Starlette(routes=[Route("/async/call", _async_call), Route("/sync/call", _sync_call)])
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    return app


def _wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with gg.current_guard().client("up") as client:
        response = client.get("/data")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [repr(_echo(response)).encode()]


@dataclass
class Stack:
    up: MisbehavingUpstream
    urls: dict[str, str]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with MisbehavingUpstream(hang_timeout=30.0) as up:
        guard = gg.Guard(
            {
                "service": "shop",
                "defaults": DEFAULTS,
                "upstreams": {"up": {"base_url": up.url}},
                "routes": [{"path": "/{kind}/call", "deadline": ROUTE_DEADLINE}],
            }
        )
        with (
            serve_asgi(starlette_app(guard)) as asgi,
            serve_wsgi(gg.GatewayGuardWSGI(_wsgi_app, guard=guard)) as wsgi,
        ):
            yield Stack(
                up,
                {
                    "asgi-async": asgi + "/async/call",
                    "asgi-sync": asgi + "/sync/call",
                    "wsgi-sync": wsgi + "/sync/call",
                },
            )


@pytest.fixture
def env(stack: Stack) -> Iterator[Stack]:
    stack.up.set_mode("ok")
    yield stack
    stack.up.set_mode("ok")


@pytest.mark.parametrize("drip", ["headers", "body"])
@pytest.mark.parametrize("app", ["asgi-async", "asgi-sync", "wsgi-sync"])
def test_route_deadline_answers_504_in_time_against_a_dripping_upstream(
    env: Stack, app: str, drip: str
) -> None:
    url = env.urls[app]
    assert httpx.get(url, timeout=WAIT).status_code == 200  # the app works
    env.up.set_mode(**DRIPS[drip])
    started = time.monotonic()
    response = httpx.get(url, headers={"accept": "application/json"}, timeout=WAIT)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text[:300]
    assert "error=http_response_timeout" in response.headers["proxy-status"]
    assert response.json()["proxy_error"] == "http_response_timeout"
    assert ROUTE_DEADLINE - 0.05 <= elapsed < ANSWER_WITHIN, elapsed


# --- outbound, no inbound request: the call's own deadline --------------------------------

CALL_DEADLINE = 1.0


def _guard(up: MisbehavingUpstream) -> gg.Guard:
    return gg.Guard(
        {
            "upstreams": {
                "up": {
                    "base_url": up.url,
                    **DEFAULTS,
                    "deadline": CALL_DEADLINE,
                    "retry": {"attempts": 1},
                }
            }
        }
    )


Outcome = tuple[float, BaseException | None]


def _sync(guard: gg.Guard, stream: bool) -> Outcome:
    """One call through a sync client, timed from the request (the client is built first)."""
    with guard.client("up") as client:
        started = time.monotonic()
        try:
            if stream:
                with client.stream("GET", "/data") as response:
                    for _ in response.iter_bytes():
                        pass
            else:
                client.get("/data")
        except Exception as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None


def _async(guard: gg.Guard, stream: bool) -> Outcome:
    async def main() -> Outcome:
        async with guard.async_client("up") as client:
            started = time.monotonic()
            try:
                if stream:
                    async with client.stream("GET", "/data") as response:
                        async for _ in response.aiter_bytes():
                            pass
                else:
                    await client.get("/data")
            except Exception as exc:
                return time.monotonic() - started, exc
            return time.monotonic() - started, None

    return asyncio.run(asyncio.wait_for(main(), WAIT))


CLIENTS = {"sync": _sync, "async": _async}


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_streamed_body_stops_mid_body_at_the_call_deadline(
    upstream: MisbehavingUpstream, client: str
) -> None:
    upstream.set_mode(**DRIPS["body"])
    guard = _guard(upstream)
    elapsed, error = CLIENTS[client](guard, True)
    assert isinstance(error, gg.UpstreamTimeout), repr(error)
    assert (error.status, error.proxy_error) == (504, "http_response_timeout")
    assert CALL_DEADLINE - 0.05 <= elapsed < CALL_DEADLINE + 0.2, elapsed


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("drip", ["headers", "failure-body"])
def test_the_call_deadline_bounds_a_dripping_head_and_failure_body(
    upstream: MisbehavingUpstream, client: str, drip: str
) -> None:
    upstream.set_mode(**DRIPS[drip])
    guard = _guard(upstream)
    elapsed, error = CLIENTS[client](guard, False)
    if drip == "headers":
        assert isinstance(error, gg.UpstreamTimeout), repr(error)
        assert (error.status, error.proxy_error) == (504, "http_response_timeout")
    else:
        # The upstream did answer 503: that is the error; the deadline cut only the
        # evidence the guard keeps of its body.
        assert isinstance(error, gg.UpstreamStatusError), repr(error)
        assert error.received_status == 503
    assert CALL_DEADLINE - 0.05 <= elapsed < CALL_DEADLINE + 0.2, elapsed
