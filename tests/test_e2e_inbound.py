"""End to end: real servers (uvicorn, cheroot), the real misbehaving upstream, real sockets.

A Starlette app (``add_middleware``) and a plain WSGI app share one Guard and call the
upstream through ``current_guard()``'s clients. For every way the upstream can fail, both
servers must answer with the right status, ``Proxy-Status``, ``Retry-After`` and request
id, and the right body for browsers, API clients and everything else; hostile input must
never come back out, and production responses must never name hosts, ports or exceptions.

Everything listens on 127.0.0.1. Every wait is bounded (``WAIT``, socket timeouts).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import http_sf
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

import gateway_guard as gg
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_asgi, serve_wsgi

pytestmark = pytest.mark.e2e

WAIT = 5.0
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: ?[\x20-\x7e]*")
SERVERS = ("asgi", "wsgi")
ACCEPTS = {"html": "text/html", "json": "application/json", "text": "*/*"}
BRAND = {
    "name": "Acme Shop",
    "support_url": "https://acme.example/support",
    "status_url": "https://status.acme.example",
}
# Short timeouts: a hung upstream costs two 0.3 s attempts, well inside the 1 s deadline.
DEFAULTS = {
    "connect_timeout": 0.3,
    "read_timeout": 0.3,
    "deadline": 1.0,
    "retry": {"attempts": 2},
    "breaker": {"min_calls": 1000, "window_size": 1000, "consecutive_timeouts": 0},
}
LEAKY = "leaky-backend"


# --- the apps ---------------------------------------------------------------------------------


async def _call(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    async with gg.current_guard().async_client(name) as client:
        response = await client.get("/data")
    return JSONResponse(_answer(response))


def _answer(response: httpx.Response) -> dict[str, Any]:
    # The upstream's "ok" echo shows the request id it was sent.
    echo = response.json() if response.status_code == 200 else {}
    return {
        "upstream_status": response.status_code,
        "upstream_saw": echo.get("headers", {}).get("x-request-id"),
    }


async def _stream(request: Request) -> StreamingResponse:
    async def body() -> Any:
        yield b"first chunk\n"
        async with gg.current_guard().async_client("up") as client:
            await client.get("/data")
        yield b"never sent\n"

    return StreamingResponse(body(), media_type="text/plain")


async def _healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(guard: gg.Guard, *extra: Route) -> Starlette:
    app = Starlette(
        routes=[
            Route("/call/{name}", _call),
            Route("/call/{name}/{rest:path}", _call),
            Route("/stream", _stream),
            Route("/healthz", _healthz),
            *extra,
        ]
    )
    # Inside Starlette's ServerErrorMiddleware (see test_asgi for why that matters).
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    return app


def _wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield b"first chunk\n"
            with gg.current_guard().client("up") as client:
                client.get("/data")
            yield b"never sent\n"

        return body()
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "call":
        with gg.current_guard().client(parts[2]) as client:
            response = client.get("/data")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(_answer(response)).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


def wsgi_app(guard: gg.Guard) -> gg.GatewayGuardWSGI:
    return gg.GatewayGuardWSGI(_wsgi_app, guard=guard)


def settings_for(up: MisbehavingUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "service": "shop",
        "brand": BRAND,
        "defaults": DEFAULTS,
        "upstreams": {
            "up": {"base_url": up.url},
            "fragile": {
                "base_url": up.url,
                "retry": {"attempts": 1},
                "breaker": {"min_calls": 2, "window_size": 2, "open_seconds": 30.0},
            },
            # A recognisable host and port, to prove neither reaches a visitor.
            LEAKY: {"base_url": f"http://localhost:{up.port}"},
        },
        **extra,
    }


@contextmanager
def serving(guard: gg.Guard) -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        yield {
            "asgi": stack.enter_context(serve_asgi(starlette_app(guard))),
            "wsgi": stack.enter_context(serve_wsgi(wsgi_app(guard))),
        }


@dataclass
class Stack:
    up: MisbehavingUpstream
    guard: gg.Guard
    urls: dict[str, str]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with MisbehavingUpstream() as up:
        guard = gg.Guard(settings_for(up))
        with serving(guard) as urls:
            yield Stack(up, guard, urls)


@pytest.fixture
def env(stack: Stack, no_backoff: None) -> Iterator[Stack]:
    """The shared stack, as new: upstream ok, every breaker closed and counted from zero."""
    stack.up.set_mode("ok")
    for name in stack.guard.upstreams:
        stack.guard.breaker(name).reset()
    yield stack
    stack.up.set_mode("ok")


# --- helpers ----------------------------------------------------------------------------------


def get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=WAIT)


def get_each_accept(url: str, rid_prefix: str) -> dict[str, httpx.Response]:
    """One request per Accept kind, concurrently (a hung upstream costs its time once)."""
    with ThreadPoolExecutor(len(ACCEPTS)) as pool:
        futures = {
            kind: pool.submit(get, url, accept=accept, **{"x-request-id": f"{rid_prefix}-{kind}"})
            for kind, accept in ACCEPTS.items()
        }
        return {kind: future.result(timeout=WAIT) for kind, future in futures.items()}


def proxy_status(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    parsed: Any = http_sf.parse(response.headers["proxy-status"].encode("ascii"), tltype="list")
    [(item, params)] = parsed
    return str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}


def assert_error_response(
    response: httpx.Response,
    kind: str,
    rid: str,
    status: int,
    errors: set[str | None],
    received: int | None = None,
    retry_after: str | None = None,
) -> None:
    """Status, headers and the negotiated body of one gateway error response."""
    assert response.status_code == status, response.text[:300]
    member, params = proxy_status(response)
    assert member == "shop"
    assert params.get("error") in errors
    assert params.get("received-status") == received
    assert set(params) <= {"error", "received-status"}  # no debug parameters in production
    if retry_after is None:
        assert "retry-after" not in response.headers
    else:
        assert response.headers["retry-after"] == retry_after
    assert response.headers["x-request-id"] == rid
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["vary"] == "Accept, Accept-Language"
    assert "server-timing" not in response.headers
    body = response.text
    if kind == "html":
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert body.startswith("<!doctype html>")
        assert '<html lang="en" dir="ltr">' in body
        assert f"<code>{rid}</code>" in body
        assert "Acme Shop" in body and "https://status.acme.example" in body
        assert "<script" not in body.lower()
        assert 'http-equiv="refresh"' not in body.lower()
    elif kind == "json":
        assert response.headers["content-type"] == "application/problem+json"
        problem = json.loads(body)
        assert problem["status"] == status
        assert problem["instance"] == f"urn:request:{rid}"
        assert problem.get("proxy_error") in errors
        assert problem.get("received_status") == received
        assert "upstream" not in problem and "exception" not in problem
        if retry_after is not None:
            assert problem["retry_after"] == int(retry_after)
    else:
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert f"Reference: {rid}" in body
        assert "<" not in body


# (mode settings, status, acceptable Proxy-Status errors, received-status, Retry-After)
FAILURES: dict[str, tuple[dict[str, Any], int, set[str | None], int | None, str | None]] = {
    "refuse": ({"mode": "refuse"}, 502, {"connection_refused"}, None, None),
    "hang": (
        {"mode": "hang"},
        504,
        {"connection_read_timeout", "http_response_timeout"},
        None,
        None,
    ),
    "reset": ({"mode": "reset"}, 502, {"connection_terminated"}, None, None),
    "garbage": ({"mode": "garbage"}, 502, {"http_protocol_error"}, None, None),
    "truncated": ({"mode": "truncated"}, 502, {"http_response_incomplete"}, None, None),
    "status-500": ({"mode": "status", "status": 500}, 502, {None}, 500, None),
    "status-503": (
        {"mode": "status", "status": 503, "retry_after": "2"},
        502,
        {None},
        503,
        "2",
    ),
}


# --- every failure mode, both servers, three media types ------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    ("mode", "status", "errors", "received", "retry_after"),
    FAILURES.values(),
    ids=FAILURES.keys(),
)
def test_upstream_failure_becomes_a_gateway_error(
    env: Stack,
    server: str,
    mode: dict[str, Any],
    status: int,
    errors: set[str | None],
    received: int | None,
    retry_after: str | None,
) -> None:
    env.up.set_mode(**mode)
    t0 = time.monotonic()
    responses = get_each_accept(env.urls[server] + "/call/up", f"{server}-{mode['mode']}")
    assert time.monotonic() - t0 < 3.0  # the deadline bounds even a hung upstream
    for kind, response in responses.items():
        assert_error_response(
            response, kind, f"{server}-{mode['mode']}-{kind}", status, errors, received, retry_after
        )
    env.up.set_mode("ok")
    assert get(env.urls[server] + "/call/up").json()["upstream_status"] == 200


@pytest.mark.parametrize("server", SERVERS)
def test_open_breaker_answers_503_without_calling_the_upstream(env: Stack, server: str) -> None:
    url = env.urls[server] + "/call/fragile"
    env.up.set_mode("status", status=500)
    for _ in range(2):  # min_calls = window = 2, both failures: the breaker opens
        assert get(url).status_code == 502
    assert env.guard.breaker("fragile").state is gg.BreakerState.OPEN

    env.up.set_mode("ok")  # healthy again, but the breaker does not know yet
    env.up.reset_stats()
    responses = get_each_accept(url, f"{server}-open")
    for kind, response in responses.items():
        retry_after = response.headers.get("retry-after", "")
        assert retry_after.isdigit() and 25 <= int(retry_after) <= 30
        assert_error_response(
            response,
            kind,
            f"{server}-open-{kind}",
            503,
            {"destination_unavailable"},
            retry_after=retry_after,
        )
    assert env.up.stats().requests == 0
    assert get(env.urls[server] + "/call/up").status_code == 200  # other upstreams unaffected


@pytest.mark.parametrize("server", SERVERS)
def test_request_id_is_echoed_or_generated_and_sent_upstream(env: Stack, server: str) -> None:
    url = env.urls[server] + "/call/up"
    given = get(url, **{"x-request-id": "client-chose-this"})
    assert given.headers["x-request-id"] == "client-chose-this"
    assert given.json() == {"upstream_status": 200, "upstream_saw": "client-chose-this"}

    generated = get(url)
    rid = generated.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(rid)
    assert generated.json() == {"upstream_status": 200, "upstream_saw": rid}


@pytest.mark.parametrize("server", SERVERS)
def test_error_after_the_response_started_breaks_the_connection(env: Stack, server: str) -> None:
    env.up.set_mode("refuse")
    with (
        httpx.Client(timeout=WAIT) as client,
        client.stream("GET", env.urls[server] + "/stream") as response,
    ):
        assert response.status_code == 200
        assert response.headers["x-request-id"]
        received: list[bytes] = []
        with pytest.raises(httpx.RemoteProtocolError):
            received.extend(response.iter_bytes())  # keeps what came before the break
    # The client saw an incomplete body, never a short one that looks whole.
    assert b"".join(received) == b"first chunk\n"


@pytest.mark.parametrize("server", SERVERS)
def test_healthz_answers_while_the_upstream_is_down(env: Stack, server: str) -> None:
    env.up.set_mode("refuse")
    response = get(env.urls[server] + "/healthz")
    assert (response.status_code, response.text) == (200, "ok")
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])


# --- hostile input --------------------------------------------------------------------------

XSS = '<script>alert("gg-xss")</script>'


def _not_reflected(response: httpx.Response, marker: str = "gg-xss") -> None:
    for name, value in response.headers.multi_items():
        assert marker not in name and marker not in value
    assert marker not in response.text
    assert "<script" not in response.text.lower()


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("kind", ACCEPTS)
def test_script_in_path_query_and_request_id_is_never_reflected(
    env: Stack, server: str, kind: str
) -> None:
    env.up.set_mode("refuse")
    base = env.urls[server]
    accept = ACCEPTS[kind]
    in_path = get(f"{base}/call/up/{XSS}", accept=accept)
    in_query = httpx.get(
        f"{base}/call/up", params={"q": XSS}, headers={"accept": accept}, timeout=WAIT
    )
    in_rid = get(f"{base}/call/up", accept=accept, **{"x-request-id": XSS})
    for response in (in_path, in_query, in_rid):
        assert response.status_code == 502
        _not_reflected(response)
    assert GENERATED_ID.fullmatch(in_rid.headers["x-request-id"])


@dataclass
class RawResponse:
    status_line: bytes
    header_lines: list[bytes]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def header(self, name: bytes) -> list[bytes]:
        prefix = name.lower() + b":"
        return [
            line.split(b":", 1)[1].strip()
            for line in self.header_lines
            if line.lower().startswith(prefix)
        ]


def raw_request(base: str, head: bytes) -> RawResponse:
    """Send ``head`` as is (httpx refuses to send such bytes) and read until close."""
    port = urlsplit(base).port
    assert port is not None
    deadline = time.monotonic() + WAIT
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(head)
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    header_block, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.split(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), raw[:200]
    return RawResponse(status_line, header_lines, body)


def _request(target: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Accept: text/html"]
    lines += headers
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


CRLF_REQUESTS = {
    "bare-lf-in-id": _request(b"/call/up", b"X-Request-ID: abc\nX-Injected: gg-crlf"),
    "bare-cr-in-id": _request(b"/call/up", b"X-Request-ID: abc\rSet-Cookie: gg-crlf=1"),
    "folded-id": _request(b"/call/up", b"X-Request-ID: abc\r\n Set-Cookie: gg-crlf=1"),
    "encoded-crlf-in-path": _request(b"/call/up/%0d%0aSet-Cookie:%20gg-crlf=1"),
    "encoded-crlf-in-query": _request(b"/call/up?q=%0d%0aSet-Cookie:%20gg-crlf=1"),
    "raw-script-in-path": _request(b"/call/up/<script>gg-crlf</script>"),
    # Both servers refuse raw UTF-8 in the request target (400): fine, nothing reflected.
    "raw-utf-8-target": _request("/call/up/caf\u00e9?q=\u00fc-gg-crlf".encode()),
    "encoded-utf-8-target": _request(b"/call/up/caf%C3%A9-gg-crlf?q=%C3%BC-gg-crlf"),
    "utf-8-id": _request(b"/call/up", "X-Request-ID: caf\u00e9-gg-crlf".encode()),
    "utf-8-accept": _request(b"/call/up", "X-Other: \u00fc-gg-crlf".encode(), b"Accept: \xff"),
    "latin-1-id": _request(b"/call/up", b"X-Request-ID: caf\xe9-gg-crlf"),
}


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("request_bytes", CRLF_REQUESTS.values(), ids=CRLF_REQUESTS.keys())
def test_crlf_and_non_ascii_never_split_or_reach_a_header(
    env: Stack, server: str, request_bytes: bytes
) -> None:
    env.up.set_mode("refuse")
    response = raw_request(env.urls[server], request_bytes)
    # The server may refuse the request outright (400), the app may find no route for it
    # (Starlette's {rest:path} stops at a newline: 404); otherwise it is our page.
    assert response.status in (400, 404, 502), response.status_line
    for line in response.header_lines:
        assert HEADER_LINE.fullmatch(line), line
        assert b"gg-crlf" not in line
    names = {line.split(b":", 1)[0].lower() for line in response.header_lines}
    assert b"set-cookie" not in names and b"x-injected" not in names
    assert b"gg-crlf" not in response.body
    assert b"<script" not in response.body.lower()
    if response.status != 400:
        # A server that ends header lines at a bare LF (h11 does) hands us "abc", a valid
        # id; anything hostile that reached us was replaced by a generated one.
        [rid] = response.header(b"x-request-id")
        assert rid == b"abc" or GENERATED_ID.fullmatch(rid.decode("ascii"))


# --- production never leaks, debug mode tells ---------------------------------------------------

LEAK_MODES: list[dict[str, Any]] = [
    {"mode": "refuse"},
    {"mode": "hang"},
    {"mode": "reset"},
    {"mode": "garbage"},
    {"mode": "truncated"},
    {"mode": "status", "status": 500, "body": "secret upstream body at localhost"},
    {"mode": "status", "status": 503, "retry_after": "2"},
]
LEAK_WORDS = (
    "localhost",
    "127.0.0.1",
    LEAKY,
    "ConnectError",
    "ReadTimeout",
    "RemoteProtocolError",
    "ReadError",
    "UpstreamConnectError",
    "UpstreamStatusError",
    "CircuitOpenError",
    "Traceback",
    "httpx",
    "httpcore",
    "Errno",
    "Connection refused",
    "connection attempts",
    "peer closed",
    "attempt(s)",
    "secret upstream body",
)


def _leaks(response: httpx.Response, port: int) -> list[str]:
    text = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    text += "\n" + response.text
    found = [word for word in LEAK_WORDS if word.lower() in text.lower()]
    if re.search(rf"(?<![0-9]){port}(?![0-9])", text):
        found.append(f"port {port}")
    return found


@pytest.mark.parametrize("server", SERVERS)
def test_production_responses_never_name_hosts_ports_or_exceptions(env: Stack, server: str) -> None:
    url = env.urls[server] + f"/call/{LEAKY}"
    leaks: dict[str, list[str]] = {}
    for mode in LEAK_MODES:
        env.up.set_mode(**mode)
        for kind, response in get_each_accept(url, "leak").items():
            assert response.status_code in (502, 504)
            leaks[f"{mode['mode']}/{kind}"] = _leaks(response, env.up.port)
    env.guard.breaker(LEAKY).force_open()
    for kind, response in get_each_accept(url, "leak").items():
        assert response.status_code == 503
        leaks[f"open/{kind}"] = _leaks(response, env.up.port)
    assert {where: found for where, found in leaks.items() if found} == {}


@pytest.fixture(scope="module")
def debug_urls(stack: Stack) -> Iterator[dict[str, str]]:
    guard = gg.Guard(settings_for(stack.up, debug=True))
    with serving(guard) as urls:
        yield urls


@pytest.mark.parametrize("server", SERVERS)
def test_debug_mode_shows_details_next_hop_and_server_timing(
    env: Stack, debug_urls: dict[str, str], server: str
) -> None:
    env.up.set_mode("refuse")
    responses = get_each_accept(debug_urls[server] + "/call/up", "debug")
    for kind, response in responses.items():
        assert response.status_code == 502
        member, params = proxy_status(response)
        assert member == "shop"
        assert params["error"] == "connection_refused"
        assert params["next-hop"] == "up"  # the configured name, not the host
        assert "connection_refused" in params["details"]
        timing = response.headers["server-timing"]
        assert "total" in timing and "upstream-up" in timing
        if kind == "json":
            problem = json.loads(response.text)
            assert problem["upstream"] == "up"
            assert problem["attempts"] == 2
            assert "ConnectError" in problem["exception"]
        elif kind == "html":
            assert "Details (debug mode)" in response.text
            assert "<script" not in response.text.lower()
        else:
            assert "Debug details" in response.text


# --- shedding -------------------------------------------------------------------------------


def test_shedding_under_uvicorn_answers_the_excess_at_once(env: Stack) -> None:
    release = threading.Event()
    admitted: list[str] = []

    async def slow(request: Request) -> PlainTextResponse:
        admitted.append(request.url.path)
        deadline = time.monotonic() + WAIT  # the slow route's own bound
        while not release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return PlainTextResponse("done")

    guard = gg.Guard(settings_for(env.up, shed={"max_concurrent": 2, "max_queue": 0}))
    app = starlette_app(guard, Route("/slow", slow))
    with serve_asgi(app) as base, ThreadPoolExecutor(10) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(get, base + "/slow") for _ in range(10)]
        rejected: list[tuple[httpx.Response, float]] = []
        try:
            for future in as_completed(futures, timeout=WAIT):
                rejected.append((future.result(), time.monotonic() - t0))
                if len(rejected) == 8:
                    break
            # Eight answered while both admitted requests are still being served.
            assert not release.is_set()
            assert len(admitted) == 2
            for response, elapsed in rejected:
                assert response.status_code == 503
                assert proxy_status(response) == ("shop", {"error": "connection_limit_reached"})
                assert int(response.headers["retry-after"]) >= 1
                assert GENERATED_ID.fullmatch(response.headers["x-request-id"])
                assert elapsed < WAIT / 2  # well under the slow route's time (WAIT)
            for _ in range(3):
                assert get(base + "/healthz").status_code == 200  # exempt, while saturated
        finally:
            release.set()
        statuses = sorted(f.result(timeout=WAIT).status_code for f in futures)
    assert statuses == [200] * 2 + [503] * 8
    assert guard.shedding.app.in_flight == 0
