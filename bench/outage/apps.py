"""The app under test, in three variants with the same routes, served by a real server.

    python bench/outage/apps.py '{"kind": "asgi", "variant": "gateway_guard", "port": 8000,
                                  "upstream": "http://127.0.0.1:9000", ...}'

(the scenarios start it; see :class:`AppConfig` for every key). Routes:

- ``GET /dep``: calls the upstream's ``/dep`` and answers its JSON (200), or an error.
- ``GET /healthy``: no upstream; ``await asyncio.sleep(0)`` (ASGI) and a constant body.
- ``GET /_bench/stats``: inbound /dep and /healthy requests and outbound attempts so far,
  counted by bench-only wrappers that are the same in every variant; and
  ``breaker_opens``, how often gateway_guard's breaker opened (a state listener).
- ``GET /_bench/breaker``: the breaker's state (``"none"`` for the plain variant).

Variants (``variant``):

- ``plain``: one shared httpx client with timeouts (connect 2 s, read ``read_timeout``,
  httpx's default pool of 100 connections). Transport errors and 5xx statuses become a
  502/504 answered by the view, as a careful app does.
- ``tenacity+pybreaker``: the same client; each call is retried by tenacity
  (``stop_after_attempt(3)``, ``wait_exponential_jitter(initial=0.1, max=2, jitter=0.1)``,
  retry on ``httpx.TransportError`` or a 502/503/504 answer), and every attempt runs inside
  ``with pybreaker.CircuitBreaker(fail_max=5, reset_timeout=open_seconds).calling():``.
  An open breaker (``CircuitBreakerError``, not retried) becomes a 503. ``calling()``
  rather than ``breaker.call(fn)`` or the decorator: those hold the breaker's RLock for
  the whole call, which would serialise every thread of the WSGI app behind one upstream
  call (and cannot await). ``breaker: false`` leaves pybreaker out (tenacity alone).
- ``gateway_guard``: ``guard.async_client("up")`` / ``guard.client("up")`` behind
  GatewayGuardMiddleware / GatewayGuardWSGI, with ``/dep`` declared ``depends_on = ["up"]``
  and the settings from :func:`guard_settings`.

Servers (``kind``): ``asgi`` is a Starlette app under uvicorn (1 worker, h11, asyncio);
``wsgi`` a plain WSGI callable under cheroot with a fixed pool of ``threads`` threads,
so a request stuck on the upstream holds one of few threads.

Bench-only instrumentation, the same for every variant: the outermost wrapper counts
inbound requests and adds ``x-bench-us``, the microseconds from the server handing the
request to the app to the response's status line (the server-side time of a request,
HTTP parsing and socket time excluded); a transport inside the httpx client counts each
outbound attempt (inside gateway_guard's transport, so retries are counted).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pybreaker
import tenacity

PLAIN = "plain"
HAND_BUILT = "tenacity+pybreaker"
GUARD = "gateway_guard"
VARIANTS = (PLAIN, HAND_BUILT, GUARD)
UPSTREAM = "up"
FAILURE_STATUSES = (502, 503, 504)


@dataclass
class AppConfig:
    kind: str  # "asgi" | "wsgi"
    variant: str  # one of VARIANTS
    port: int
    upstream: str
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    open_seconds: float = 3.0
    threads: int = 8  # wsgi only
    breaker: bool = True  # false: no breaker (tenacity alone / gateway_guard breaker off)
    # None: gateway_guard's own default (the bench judges the defaults).
    budget_ratio: float | None = None
    budget_min_per_second: float | None = None
    shed: dict[str, Any] | None = None  # gateway_guard [shed]; None: the defaults
    extra: dict[str, Any] = field(default_factory=dict)


def guard_settings(cfg: AppConfig) -> dict[str, Any]:
    """gateway_guard's settings for the bench: its defaults, but for the timeouts and the
    open time the bench sets for every variant alike (and what a run overrides)."""
    shed: dict[str, Any] = dict(cfg.shed or {})
    shed.setdefault("exempt", ["/_bench/stats", "/_bench/breaker"])
    retry: dict[str, Any] = {"attempts": 3}
    if cfg.budget_ratio is not None:
        retry["budget_ratio"] = cfg.budget_ratio
    if cfg.budget_min_per_second is not None:
        retry["budget_min_per_second"] = cfg.budget_min_per_second
    return {
        "service": "bench",
        "upstreams": {
            UPSTREAM: {
                "base_url": cfg.upstream,
                "connect_timeout": cfg.connect_timeout,
                "read_timeout": cfg.read_timeout,
                # The deadline of the defaults before #15 (4 s since): a full run's 5 s read
                # timeout must fit, and the figures stay comparable with earlier runs.
                "deadline": 15.0,
                "retry": retry,
                "breaker": {"enabled": cfg.breaker, "open_seconds": cfg.open_seconds},
            }
        },
        "shed": shed,
        "routes": [{"path": "/dep", "depends_on": [UPSTREAM]}],
    }


# --- bench-only counters ----------------------------------------------------------------


class Counters:
    """Thread-safe counts of inbound requests and outbound attempts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {
            "dep": 0,
            "healthy": 0,
            "attempts": 0,
            "attempt_errors": 0,
            "attempt_failure_status": 0,
            "breaker_opens": 0,
        }

    def count_opens(self, guard: Any) -> None:
        """Count every time gateway_guard's breaker opens (scenario 3: "no trip")."""

        def listener(_breaker: Any, _old: Any, new: Any) -> None:
            if new == "open":
                self.add("breaker_opens")

        guard.breaker(UPSTREAM).add_listener(listener)

    def add(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class CountingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, counters: Counters) -> None:
        self._inner = inner
        self._counters = counters

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._counters.add("attempts")
        try:
            response = self._inner.handle_request(request)
        except httpx.TransportError:
            self._counters.add("attempt_errors")
            raise
        if response.status_code in FAILURE_STATUSES:
            self._counters.add("attempt_failure_status")
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncCountingTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, counters: Counters) -> None:
        self._inner = inner
        self._counters = counters

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._counters.add("attempts")
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.TransportError:
            self._counters.add("attempt_errors")
            raise
        if response.status_code in FAILURE_STATUSES:
            self._counters.add("attempt_failure_status")
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- the hand-built variant's pieces --------------------------------------------------------


class BadStatus(Exception):
    """The upstream answered 502/503/504: retried by tenacity, a failure for pybreaker."""


def _tenacity_kwargs() -> dict[str, Any]:
    return {
        "stop": tenacity.stop_after_attempt(3),
        "wait": tenacity.wait_exponential_jitter(initial=0.1, max=2.0, jitter=0.1),
        "retry": tenacity.retry_if_exception_type((httpx.TransportError, BadStatus)),
        "reraise": True,
    }


def _pybreaker(cfg: AppConfig) -> Any:
    if not cfg.breaker:
        return None
    return pybreaker.CircuitBreaker(fail_max=5, reset_timeout=cfg.open_seconds)


def _error_for(exc: BaseException) -> tuple[int, bytes]:
    """What the plain and hand-built views answer for a failed call."""
    if isinstance(exc, pybreaker.CircuitBreakerError):
        return 503, b'{"error": "upstream unavailable (circuit open)"}'
    if isinstance(exc, httpx.TimeoutException):
        return 504, b'{"error": "upstream timed out"}'
    return 502, b'{"error": "upstream failed"}'


# --- ASGI ---------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TimedASGI:
    """Outermost: counts inbound requests, stamps x-bench-us on the response start."""

    def __init__(self, app: ASGIApp, counters: Counters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        if path == "/dep":
            self.counters.add("dep")
        elif path == "/healthy":
            self.counters.add("healthy")

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                us = str(int((time.perf_counter() - t0) * 1e6)).encode()
                headers = [*message.get("headers", ()), (b"x-bench-us", us)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


def build_asgi(cfg: AppConfig) -> ASGIApp:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    import gateway_guard as gg

    counters = Counters()
    holder: dict[str, httpx.AsyncClient] = {}
    guard = gg.Guard(guard_settings(cfg)) if cfg.variant == GUARD else None
    if guard is not None:
        counters.count_opens(guard)
    breaker = _pybreaker(cfg) if cfg.variant == HAND_BUILT else None

    def make_client() -> httpx.AsyncClient:
        transport = AsyncCountingTransport(httpx.AsyncHTTPTransport(), counters)
        if guard is not None:
            return guard.async_client(UPSTREAM, transport=transport)
        timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout)
        return httpx.AsyncClient(base_url=cfg.upstream, timeout=timeout, transport=transport)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with make_client() as client:
            holder["client"] = client
            yield

    async def call_once() -> httpx.Response:
        response = await holder["client"].get("/dep")
        if cfg.variant == HAND_BUILT and response.status_code in FAILURE_STATUSES:
            raise BadStatus(response.status_code)
        return response

    async def call_hand_built() -> httpx.Response:
        async for attempt in tenacity.AsyncRetrying(**_tenacity_kwargs()):
            with attempt:
                if breaker is None:
                    return await call_once()
                with breaker.calling():
                    return await call_once()
        raise AssertionError("unreachable: reraise=True")  # pragma: no cover

    async def dep(request: Request) -> Response:
        if guard is not None:
            # Failures raise gg.UpstreamError: the middleware answers them.
            response = await holder["client"].get("/dep")
            return JSONResponse(response.json())
        try:
            if cfg.variant == HAND_BUILT:
                response = await call_hand_built()
            else:
                response = await call_once()
        except Exception as exc:
            status, body = _error_for(exc)
            return Response(body, status, media_type="application/json")
        if response.status_code >= 500:
            return Response(b'{"error": "upstream failed"}', 502, media_type="application/json")
        return JSONResponse(response.json())

    async def healthy(request: Request) -> Response:
        await asyncio.sleep(0)
        return PlainTextResponse("ok")

    async def stats(request: Request) -> Response:
        return JSONResponse(counters.snapshot())

    async def breaker_state(request: Request) -> Response:
        return JSONResponse(_breaker_state(guard, breaker))

    app = Starlette(
        routes=[
            Route("/dep", dep),
            Route("/healthy", healthy),
            Route("/_bench/stats", stats),
            Route("/_bench/breaker", breaker_state),
        ],
        lifespan=lifespan,
    )
    if guard is not None:
        app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
    return TimedASGI(app, counters)


def _breaker_state(guard: Any, breaker: Any) -> dict[str, Any]:
    if guard is not None:
        snap = guard.breaker(UPSTREAM).snapshot()
        return {
            "state": str(snap.state.value),
            "open_remaining": snap.open_remaining,
            "consecutive_opens": snap.consecutive_opens,
        }
    if breaker is not None:
        state = str(breaker.current_state).replace("-", "_")
        return {"state": state, "open_remaining": None, "consecutive_opens": None}
    return {"state": "none", "open_remaining": None, "consecutive_opens": None}


def serve_asgi(cfg: AppConfig) -> None:
    import uvicorn

    config = uvicorn.Config(
        build_asgi(cfg),
        host="127.0.0.1",
        port=cfg.port,
        workers=1,
        loop="asyncio",
        http="h11",
        lifespan="on",
        log_level="warning",
        access_log=False,
        backlog=4096,
        # Keep idle load-generator connections open for the whole run.
        timeout_keep_alive=300,
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run()


# --- WSGI ---------------------------------------------------------------------------------

StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class TimedWSGI:
    """Outermost: counts inbound requests, stamps x-bench-us when the status goes out."""

    def __init__(self, app: WSGIApp, counters: Counters) -> None:
        self.app = app
        self.counters = counters

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        t0 = time.perf_counter()
        path = environ.get("PATH_INFO", "")
        if path == "/dep":
            self.counters.add("dep")
        elif path == "/healthy":
            self.counters.add("healthy")

        def timed_start(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            us = str(int((time.perf_counter() - t0) * 1e6))
            headers = [*headers, ("X-Bench-Us", us)]
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return self.app(environ, timed_start)


def build_wsgi(cfg: AppConfig) -> WSGIApp:
    import gateway_guard as gg

    counters = Counters()
    guard = gg.Guard(guard_settings(cfg)) if cfg.variant == GUARD else None
    if guard is not None:
        counters.count_opens(guard)
    breaker = _pybreaker(cfg) if cfg.variant == HAND_BUILT else None
    transport = CountingTransport(httpx.HTTPTransport(), counters)
    if guard is not None:
        client = guard.client(UPSTREAM, transport=transport)
    else:
        timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout)
        client = httpx.Client(base_url=cfg.upstream, timeout=timeout, transport=transport)

    def call_once() -> httpx.Response:
        response = client.get("/dep")
        if cfg.variant == HAND_BUILT and response.status_code in FAILURE_STATUSES:
            raise BadStatus(response.status_code)
        return response

    def call_hand_built() -> httpx.Response:
        # What @tenacity.retry(...) does, spelled as its loop (same as the ASGI variant).
        for attempt in tenacity.Retrying(**_tenacity_kwargs()):
            with attempt:
                if breaker is None:
                    return call_once()
                with breaker.calling():
                    return call_once()
        raise AssertionError("unreachable: reraise=True")  # pragma: no cover

    def dep() -> tuple[int, bytes]:
        if guard is not None:
            return 200, json.dumps(client.get("/dep").json()).encode()
        try:
            response = call_hand_built() if cfg.variant == HAND_BUILT else call_once()
        except Exception as exc:
            return _error_for(exc)
        if response.status_code >= 500:
            return 502, b'{"error": "upstream failed"}'
        return 200, json.dumps(response.json()).encode()

    reasons = {200: "200 OK", 404: "404 Not Found", 502: "502 Bad Gateway"}
    reasons |= {503: "503 Service Unavailable", 504: "504 Gateway Timeout"}

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        content_type = "application/json"
        if path == "/healthy":
            status, body, content_type = 200, b"ok", "text/plain"
        elif path == "/dep":
            status, body = dep()
        elif path == "/_bench/stats":
            status, body = 200, json.dumps(counters.snapshot()).encode()
        elif path == "/_bench/breaker":
            status, body = 200, json.dumps(_breaker_state(guard, breaker)).encode()
        else:
            status, body = 404, b"{}"
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(reasons[status], headers)
        return [body]

    wrapped: WSGIApp = app
    if guard is not None:
        wrapped = gg.GatewayGuardWSGI(app, guard=guard)
    return TimedWSGI(wrapped, counters)


def serve_wsgi(cfg: AppConfig) -> None:
    from cheroot import wsgi

    server = wsgi.Server(
        ("127.0.0.1", cfg.port),
        build_wsgi(cfg),
        numthreads=cfg.threads,
        max=cfg.threads,
        request_queue_size=4096,
        timeout=60,
    )
    # The default (10) closes keep-alive connections beyond ten idle ones; the load
    # generator keeps more than that open.
    server.keep_alive_conn_limit = 4096
    try:
        server.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: list[str]) -> int:
    cfg = AppConfig(**json.loads(argv[1]))
    if cfg.variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")
    if cfg.kind == "asgi":
        serve_asgi(cfg)
    elif cfg.kind == "wsgi":
        serve_wsgi(cfg)
    else:
        raise SystemExit(f"kind must be asgi or wsgi, got {cfg.kind!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
