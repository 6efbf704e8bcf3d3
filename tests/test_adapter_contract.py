"""One contract for every inbound adapter: ASGI, WSGI, Flask and Django (sync and async).

Each adapter serves the same small app (the views of ``plan()``, written once per
framework below) through a client with one interface, and every inbound behaviour is
asserted once, here, for all of them: status, Proxy-Status, Retry-After, X-Request-ID, the
body per media type, HEAD, shedding, dependency-aware shedding, re-branding and streaming.
What only one adapter does stays in its own module: WSGI's close() and exc_info rules,
ASGI's lifespan and websocket pass-through and asyncio concurrency, Flask's error-handler
precedence and per-view policies, Django's process_exception, system checks and
@gateway_policy.

Nothing here is mocked but the upstream (``httpx.MockTransport``). The ASGI and WSGI
adapters wrap bare apps, driven by hand-written servers that check the protocol (one
response start, a finished body; ``wsgiref.validate``); Flask and Django are driven by
their own test clients. Every wait is bounded by ``WAIT``.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from wsgiref.validate import validator

import aiohttp
import aiohttp.http_exceptions
import http_sf
import httpx
import pytest
import requests
import urllib3

import django_setup
import gateway_guard as gg
from gateway_guard.testing import testing

WAIT = 5.0
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
APP_PAGE = b"the app's own page"
APP_HEADERS = [("content-type", "text/plain"), ("set-cookie", "s=1")]
CHUNKS = [b"chunk 0\n", b"chunk 1\n", b"chunk 2\n"]
HTML, JSON = "text/html", "application/json"

ADAPTERS = ["asgi", "wsgi", "flask", "django", "django-async"]


def settings(**extra: Any) -> dict[str, Any]:
    """gateway_guard settings: service ``shop``, brand ``Acme Shop``, upstream ``up``."""
    return {
        "service": "shop",
        "brand": {"name": "Acme Shop"},
        "upstreams": {"up": {"base_url": "http://up.test"}},
        **extra,
    }


# --- what every app does, whatever its framework ----------------------------------------------


@dataclass
class Probe:
    """What the views saw and did, shared by a test and the app it drives."""

    ran: list[str] = field(default_factory=list)
    seen: list[tuple[str, gg.Guard]] = field(default_factory=list)
    upstream_ids: list[str | None] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def record_upstream(self, request: httpx.Request) -> None:
        self.upstream_ids.append(request.headers.get("x-request-id"))


# The errors /raise/KIND raises: (error, status, Proxy-Status params, Retry-After, text of
# the error that must never reach the visitor).
ERRORS: dict[str, tuple[Callable[[], Exception], int, dict[str, Any], str | None, str | None]] = {
    "refused": (
        lambda: gg.UpstreamConnectError(
            "connect to http://10.1.2.3:8080 failed", upstream="up", attempts=3
        ),
        502,
        {"error": "connection_refused"},
        None,
        "10.1.2.3",
    ),
    "timeout": (
        lambda: gg.UpstreamTimeout("slow", proxy_error="connection_read_timeout", upstream="up"),
        504,
        {"error": "connection_read_timeout"},
        None,
        None,
    ),
    "incomplete": (
        lambda: gg.UpstreamProtocolError(
            "cut", proxy_error="http_response_incomplete", upstream="up"
        ),
        502,
        {"error": "http_response_incomplete"},
        None,
        None,
    ),
    "status": (
        lambda: gg.UpstreamStatusError("500", upstream="up", received_status=500),
        502,
        {"received-status": 500},
        None,
        None,
    ),
    "status-retry-after": (
        lambda: gg.UpstreamStatusError("503", upstream="up", received_status=503, retry_after=2.0),
        502,
        {"received-status": 503},
        "2",
        None,
    ),
    "circuit": (
        lambda: gg.CircuitOpenError("open", upstream="up", retry_after=12.2),
        503,
        {"error": "destination_unavailable"},
        "13",
        None,
    ),
    "shed": (
        lambda: gg.LoadShedError("full", upstream="up"),
        503,
        {"error": "connection_limit_reached"},
        "5",
        None,
    ),
    # Raised by an unguarded httpx client: still an upstream failure, classified.
    "httpx-connect": (
        lambda: httpx.ConnectError("[Errno 111] Connection refused"),
        502,
        {"error": "connection_refused"},
        None,
        "Errno",
    ),
    "httpx-read-timeout": (
        lambda: httpx.ReadTimeout("read timed out"),
        504,
        {"error": "connection_read_timeout"},
        None,
        "timed out",
    ),
    "httpx-protocol": (
        lambda: httpx.RemoteProtocolError("illegal status line"),
        502,
        {"error": "http_protocol_error"},
        None,
        "illegal",
    ),
    # A corrupt Content-Encoding: httpx raises it while the app reads the body, and it is
    # not a TransportError (issue #15, defect 2).
    "httpx-decoding": (
        lambda: httpx.DecodingError("Error -3 while decompressing data: incorrect header check"),
        502,
        {"error": "http_response_content_coding"},
        None,
        "decompressing",
    ),
    # Uncaught raise_for_status() for a 5xx: the upstream's failure, with what it answered.
    "httpx-5xx": (
        lambda: httpx.HTTPStatusError(
            "Server error '503 Service Unavailable' for url 'http://10.1.2.3:8080/x'",
            request=httpx.Request("GET", "http://10.1.2.3:8080/x"),
            response=httpx.Response(503, headers={"Retry-After": "9"}),
        ),
        502,
        {"received-status": 503},
        "9",
        "10.1.2.3",
    ),
    # The optional clients' failures, known by name (gateway_guard never imports them).
    "requests-connect": (
        lambda: requests.ConnectionError(
            urllib3.exceptions.MaxRetryError(
                None,  # type: ignore[arg-type]
                "/charges",
                urllib3.exceptions.NewConnectionError(
                    None,  # type: ignore[arg-type]
                    "Failed to establish a new connection: [Errno 111] Connection refused",
                ),
            )
        ),
        502,
        {"error": "connection_refused"},
        None,
        "Errno",
    ),
    "requests-read-timeout": (
        lambda: requests.ReadTimeout(
            urllib3.exceptions.ReadTimeoutError(
                None,  # type: ignore[arg-type]
                "/x",
                "HTTPConnectionPool(host='10.1.2.3', port=8080): Read timed out.",
            )
        ),
        504,
        {"error": "connection_read_timeout"},
        None,
        "10.1.2.3",
    ),
    "requests-5xx": (
        lambda: requests.HTTPError(
            "503 Server Error: Service Unavailable for url: http://10.1.2.3:8080/charges",
            response=requests_response(503, {"Retry-After": "7"}),
        ),
        502,
        {"received-status": 503},
        "7",
        "10.1.2.3",
    ),
    "urllib3-disconnected": (
        lambda: urllib3.exceptions.ProtocolError(
            "Connection aborted.",
            http.client.RemoteDisconnected("Remote end closed connection without response"),
        ),
        502,
        {"error": "connection_terminated"},
        None,
        "aborted",
    ),
    "aiohttp-disconnected": (
        aiohttp.ServerDisconnectedError,
        502,
        {"error": "connection_terminated"},
        None,
        None,
    ),
    "aiohttp-payload": (
        lambda: chained(
            aiohttp.ClientPayloadError("Response payload is not completed"),
            aiohttp.http_exceptions.ContentLengthError("Not enough data (received 100 of 1000)"),
        ),
        502,
        {"error": "http_response_incomplete"},
        None,
        "received 100",
    ),
    "aiohttp-5xx": (
        lambda: aiohttp.ClientResponseError(
            None,  # type: ignore[arg-type]
            (),
            status=502,
            message="Bad Gateway from 10.1.2.3",
        ),
        502,
        {"received-status": 502},
        None,
        "10.1.2.3",
    ),
}


def requests_response(status: int, headers: dict[str, str]) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers)
    response.url = "http://10.1.2.3:8080/charges"
    return response


def chained(exc: Exception, cause: Exception) -> Exception:
    exc.__cause__ = cause
    return exc


@dataclass(frozen=True)
class Respond:
    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes]


@dataclass(frozen=True)
class Raise:
    error: Callable[[], Exception]


@dataclass(frozen=True)
class Stream:
    status: int


@dataclass(frozen=True)
class Slow:
    pass


@dataclass(frozen=True)
class CallUpstream:
    """Call upstream ``up`` through the request's Guard; it answers ``status``."""

    status: int


@dataclass(frozen=True)
class WhoAmI:
    pass


Plan = Respond | Raise | Stream | Slow | CallUpstream | WhoAmI


def ok(body: bytes = b"ok") -> Respond:
    return Respond(200, [("content-type", "text/plain")], [body])


def app_page(status: int, *extra: tuple[str, str]) -> Respond:
    # In two chunks: a re-branded page must drop every one of them.
    return Respond(status, [*APP_HEADERS, *extra], [APP_PAGE[:9], APP_PAGE[9:]])


def plan(path: str) -> Plan | None:
    """What the app does for ``path`` (None: not found). Every adapter's app follows it."""
    fixed: dict[str, Plan] = {
        "/ok": ok(),
        "/healthz": ok(),
        "/metrics/app": ok(),
        "/pay": ok(b"paid"),
        "/other": ok(),
        "/slow": Slow(),
        "/whoami": WhoAmI(),
        "/propagate": CallUpstream(200),
        "/guarded-fail": CallUpstream(503),
        "/own-id": Respond(
            200, [("content-type", "text/plain"), ("x-request-id", "from-the-app")], [b"mine"]
        ),
        # An app's own error page that says what failed: not ours to re-brand.
        "/explained": Respond(
            502,
            [("content-type", "text/plain"), ("proxy-status", "shop; error=dns_error")],
            [b"explained"],
        ),
        "/stream": Stream(200),
        "/stream/502": Stream(502),
    }
    if path in fixed:
        return fixed[path]
    if path.startswith("/raise/") and path[7:] in ERRORS:
        return Raise(ERRORS[path[7:]][0])
    if path == "/raise/requests-4xx":
        return Raise(
            lambda: requests.HTTPError("404 Client Error", response=requests_response(404, {}))
        )
    if path == "/raise/httpx-4xx":
        return Raise(
            lambda: httpx.HTTPStatusError(
                "404",
                request=httpx.Request("GET", "http://up.test/x"),
                response=httpx.Response(404),
            )
        )
    for status in (404, 500, 502, 503, 504):
        if path == f"/app/{status}":
            return app_page(status)
        if path == f"/app/{status}/later":
            return app_page(status, ("retry-after", "120"))
    return None


def who_am_i(probe: Probe) -> bytes:
    ctx = gg.current_context()
    assert ctx is not None
    probe.seen.append((ctx.request_id, gg.current_guard()))
    return ctx.request_id.encode()


def call_upstream(probe: Probe, status: int) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        probe.record_upstream(request)
        return httpx.Response(status)

    with gg.current_guard().client("up", transport=httpx.MockTransport(upstream)) as client:
        client.get("/thing")


async def acall_upstream(probe: Probe, status: int) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        probe.record_upstream(request)
        return httpx.Response(status)

    mock = httpx.MockTransport(upstream)
    async with gg.current_guard().async_client("up", transport=mock) as client:
        await client.get("/thing")


def wait_for_release(probe: Probe) -> None:
    probe.entered.set()
    if not probe.release.wait(WAIT):
        raise AssertionError("the slow view was never released")


async def await_release(probe: Probe) -> None:
    probe.entered.set()
    deadline = time.monotonic() + WAIT
    while not probe.release.is_set():
        if time.monotonic() > deadline:
            raise AssertionError("the slow view was never released")
        await asyncio.sleep(0.001)


def chunks(probe: Probe) -> Iterator[bytes]:
    for i, chunk in enumerate(CHUNKS):
        probe.events.append(f"sent {i}")
        yield chunk


async def achunks(probe: Probe) -> AsyncIterator[bytes]:
    for i, chunk in enumerate(CHUNKS):
        probe.events.append(f"sent {i}")
        yield chunk


# --- the uniform client -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order sent
    body: bytes
    reason: str | None = None  # the reason phrase, where the protocol has one

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        assert value is not None, f"no {name} header"
        return value

    def json(self) -> Any:
        return json.loads(self.body)


Headers = Mapping[str, str | bytes]
OnChunk = Callable[[bytes], None]


def wire(value: str | bytes) -> bytes:
    """A header value as it arrives on the wire (str values are ASCII or Latin-1)."""
    return value if isinstance(value, bytes) else value.encode("latin-1")


def cgi(value: str | bytes) -> str:
    """A header value as PEP 3333 (and Django's META) hand it over: Latin-1 decoded."""
    return value if isinstance(value, str) else value.decode("latin-1")


class Client:
    """An app with the views of ``plan()``, behind one adapter, and a way to call it."""

    guard: gg.Guard

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def request(self, path: str, method: str = "GET", headers: Headers | None = None) -> Reply:
        return self._call(path, method, headers, None)

    def stream(self, path: str, headers: Headers | None = None) -> Reply:
        """GET ``path``, noting ``got N`` in the probe's events as each chunk arrives."""
        return self._call(path, "GET", headers, self._got())

    def _call(
        self, path: str, method: str, headers: Headers | None, on_chunk: OnChunk | None
    ) -> Reply:  # pragma: no cover - every adapter has its own
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _got(self) -> OnChunk:
        count = 0

        def on_chunk(chunk: bytes) -> None:
            nonlocal count
            self.probe.events.append(f"got {count}")
            count += 1

        return on_chunk


# --- ASGI: a bare app, driven by a hand-written server ----------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def asgi_app(probe: Probe) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def start(send: Send, status: int, headers: Iterable[tuple[str, str]]) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw})

    async def respond(send: Send, response: Respond) -> None:
        await start(send, response.status, response.headers)
        for i, chunk in enumerate(response.chunks):
            more = i < len(response.chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        probe.ran.append(path)
        match plan(path):
            case None:
                await respond(send, Respond(404, [("content-type", "text/plain")], [b"nope"]))
            case Respond() as response:
                await respond(send, response)
            case Raise(error):
                raise error()
            case Stream(status):
                await start(send, status, [("content-type", "text/plain")])
                async for chunk in achunks(probe):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            case Slow():
                await await_release(probe)
                await respond(send, ok(b"done"))
            case CallUpstream(status):
                await acall_upstream(probe, status)
                await respond(send, ok())
            case WhoAmI():
                await respond(send, ok(who_am_i(probe)))

    return app


class ASGIClient(Client):
    def __init__(self, probe: Probe, source: dict[str, Any]) -> None:
        super().__init__(probe)
        self.guard = gg.Guard(source)
        self.app = gg.GatewayGuardMiddleware(asgi_app(probe), guard=self.guard)

    def _call(
        self, path: str, method: str, headers: Headers | None, on_chunk: OnChunk | None
    ) -> Reply:
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), wire(v)) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        messages: list[Message] = []
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if requested:
                await asyncio.sleep(WAIT)  # a client that stays connected
                return {"type": "http.disconnect"}
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and message.get("body") and on_chunk:
                on_chunk(message["body"])

        async def serve() -> None:
            async with asyncio.timeout(WAIT):
                await self.app(scope, receive, send)

        asyncio.run(serve())
        # The protocol, as a server checks it: one start, then a body that ends.
        [start] = [m for m in messages if m["type"] == "http.response.start"]
        assert messages[0] is start
        bodies = messages[1:]
        assert bodies and all(m["type"] == "http.response.body" for m in bodies)
        assert not bodies[-1].get("more_body", False)
        return Reply(
            status=start["status"],
            headers=[
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in start["headers"]
            ],
            body=b"".join(m.get("body", b"") for m in bodies),
        )


# --- WSGI: a bare app, driven by a hand-written server under wsgiref.validate -----------------

StartResponse = Callable[..., Callable[[bytes], object]]


def wsgi_app(probe: Probe) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def status_line(status: int) -> str:
        return f"{status} {HTTPStatus(status).phrase}"

    def respond(start_response: StartResponse, response: Respond) -> list[bytes]:
        start_response(status_line(response.status), list(response.headers))
        return list(response.chunks)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        probe.ran.append(path)
        match plan(path):
            case None:
                return respond(start_response, Respond(404, [("content-type", "text/plain")], []))
            case Respond() as response:
                return respond(start_response, response)
            case Raise(error):
                raise error()
            case Stream(status):
                start_response(status_line(status), [("content-type", "text/plain")])
                return chunks(probe)
            case Slow():
                wait_for_release(probe)
                return respond(start_response, ok(b"done"))
            case CallUpstream(status):
                call_upstream(probe, status)
                return respond(start_response, ok())
            case WhoAmI():
                return respond(start_response, ok(who_am_i(probe)))
        raise AssertionError("unreachable")  # pragma: no cover

    return app


def wsgi_environ(path: str, method: str, headers: Headers | None) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = cgi(value)
    return environ


class WSGIClient(Client):
    def __init__(self, probe: Probe, source: dict[str, Any]) -> None:
        super().__init__(probe)
        self.guard = gg.Guard(source)
        self.app = gg.GatewayGuardWSGI(wsgi_app(probe), guard=self.guard)

    def _call(
        self, path: str, method: str, headers: Headers | None, on_chunk: OnChunk | None
    ) -> Reply:
        started: list[tuple[str, list[tuple[str, str]]]] = []
        sent = False

        def start_response(
            status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            if started and exc_info is None:
                raise AssertionError("start_response called again without exc_info")
            if exc_info is not None and sent:
                raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: too late
            started.append((status, list(response_headers)))
            return body.append

        body: list[bytes] = []
        result = validator(self.app)(wsgi_environ(path, method, headers), start_response)
        try:
            for chunk in result:
                if chunk:
                    sent = True
                    if on_chunk:
                        on_chunk(chunk)
                body.append(chunk)
        finally:
            result.close()  # type: ignore[attr-defined]
        status, response_headers = started[-1]
        code, _, reason = status.partition(" ")
        return Reply(
            status=int(code),
            headers=[(k.lower(), v) for k, v in response_headers],
            body=b"".join(body),
            reason=reason,
        )


# --- Flask: the extension on a Flask app, driven by Flask's test client -----------------------


def flask_app(probe: Probe, source: dict[str, Any]) -> tuple[Any, gg.Guard]:
    from flask import Flask, Response
    from werkzeug.exceptions import NotFound

    from gateway_guard.flask import GatewayGuard

    app = Flask("contract")
    app.config["GATEWAY_GUARD"] = source
    ext = GatewayGuard(app)

    def respond(response: Respond) -> Response:
        return Response(b"".join(response.chunks), response.status, list(response.headers))

    def view(rest: str = "") -> Response:
        path = "/" + rest
        probe.ran.append(path)
        match plan(path):
            case None:
                raise NotFound()
            case Respond() as response:
                return respond(response)
            case Raise(error):
                raise error()
            case Stream(status):
                return Response(chunks(probe), status, mimetype="text/plain")
            case Slow():
                wait_for_release(probe)
                return respond(ok(b"done"))
            case CallUpstream(status):
                call_upstream(probe, status)
                return respond(ok())
            case WhoAmI():
                return respond(ok(who_am_i(probe)))
        raise AssertionError("unreachable")  # pragma: no cover

    app.add_url_rule("/<path:rest>", view_func=view)
    return app, ext.guard


class FlaskClient(Client):
    def __init__(self, probe: Probe, source: dict[str, Any]) -> None:
        super().__init__(probe)
        self.app, self.guard = flask_app(probe, source)

    def _call(
        self, path: str, method: str, headers: Headers | None, on_chunk: OnChunk | None
    ) -> Reply:
        # Headers as a server hands them over (werkzeug's client refuses CR/LF in values).
        environ = {
            "HTTP_" + k.upper().replace("-", "_"): cgi(v) for k, v in (headers or {}).items()
        }
        response = self.app.test_client().open(
            path, method=method, environ_overrides=environ, buffered=on_chunk is None
        )
        try:
            body = []
            for chunk in response.response:
                if chunk and on_chunk:
                    on_chunk(chunk)
                body.append(chunk)
        finally:
            response.close()  # as a WSGI server does: releases the slot and the context
        return Reply(
            status=response.status_code,
            headers=[(k.lower(), v) for k, v in response.headers.items()],
            body=b"".join(body),
            reason=response.status.partition(" ")[2],
        )


# --- Django: the middleware in a Django project, driven by Django's test clients --------------


class URLConf:
    """A URLconf object (ROOT_URLCONF may be one): every path goes to ``view``."""

    def __init__(self, view: Callable[..., Any]) -> None:
        from django.urls import re_path

        self.urlpatterns = [re_path(r"^(?P<rest>.*)$", view)]


def django_view(probe: Probe, mode: str) -> Callable[..., Any]:
    from django.http import Http404, HttpResponse, StreamingHttpResponse

    def respond(response: Respond) -> HttpResponse:
        return HttpResponse(
            b"".join(response.chunks), status=response.status, headers=dict(response.headers)
        )

    def immediate(path: str) -> Any:
        """The plans that do not depend on the mode; None for those that do."""
        probe.ran.append(path)
        match plan(path):
            case None:
                raise Http404()
            case Respond() as response:
                return respond(response)
            case Raise(error):
                raise error()
            case WhoAmI():
                return respond(ok(who_am_i(probe)))
        return None

    if mode == "sync":

        def view(request: Any, rest: str) -> Any:
            path = "/" + rest
            response = immediate(path)
            if response is not None:
                return response
            match plan(path):
                case Stream(status):
                    return StreamingHttpResponse(
                        chunks(probe), status=status, content_type="text/plain"
                    )
                case Slow():
                    wait_for_release(probe)
                    return respond(ok(b"done"))
                case CallUpstream(status):
                    call_upstream(probe, status)
                    return respond(ok())
            raise AssertionError("unreachable")  # pragma: no cover

        return view

    # Async views under Django's async handler (sync generators would make it warn).
    async def aview(request: Any, rest: str) -> Any:
        path = "/" + rest
        response = immediate(path)
        if response is not None:
            return response
        match plan(path):
            case Stream(status):
                return StreamingHttpResponse(
                    achunks(probe), status=status, content_type="text/plain"
                )
            case Slow():
                await await_release(probe)
                return respond(ok(b"done"))
            case CallUpstream(status):
                await acall_upstream(probe, status)
                return respond(ok())
        raise AssertionError("unreachable")  # pragma: no cover

    return aview


class DjangoClient(Client):
    def __init__(self, probe: Probe, source: dict[str, Any], mode: str) -> None:
        from django.test import override_settings

        from gateway_guard.django import get_guard

        super().__init__(probe)
        self.mode = mode
        self._settings = override_settings(
            ROOT_URLCONF=URLConf(django_view(probe, mode)),
            MIDDLEWARE=[django_setup.MIDDLEWARE],
            GATEWAY_GUARD=source,
        )
        self._settings.enable()
        self.guard = get_guard()

    def close(self) -> None:
        self._settings.disable()

    def _call(
        self, path: str, method: str, headers: Headers | None, on_chunk: OnChunk | None
    ) -> Reply:
        from django.test import AsyncClient
        from django.test import Client as SyncClient

        # raise_request_exception=False: the response is what is under test.
        fields = {k: cgi(v) for k, v in (headers or {}).items()}
        body: list[bytes] = []

        def take(chunk: bytes) -> None:
            if chunk and on_chunk:
                on_chunk(chunk)
            body.append(chunk)

        if self.mode == "sync":
            response: Any = SyncClient(raise_request_exception=False).generic(
                method, path, headers=fields
            )
            try:
                if response.streaming:
                    for chunk in response.streaming_content:
                        take(chunk)
                else:
                    take(response.content)
            finally:
                response.close()
        else:

            async def fetch() -> Any:
                client = AsyncClient(raise_request_exception=False)
                response: Any = await client.generic(method, path, headers=fields)
                if response.streaming:
                    async for chunk in response.streaming_content:
                        take(chunk)
                else:
                    take(response.content)
                return response

            async def bounded() -> Any:
                async with asyncio.timeout(WAIT):
                    return await fetch()

            response = asyncio.run(bounded())
            response.close()
        return Reply(
            status=response.status_code,
            headers=[(k.lower(), v) for k, v in response.items()],
            body=b"".join(body),
            reason=response.reason_phrase,
        )


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    with testing():
        yield


@pytest.fixture
def probe() -> Probe:
    return Probe()


MakeClient = Callable[..., Client]


@pytest.fixture
def make_client(adapter: str, probe: Probe) -> Iterator[MakeClient]:
    """``make_client(**settings)``: the app behind ``adapter``, with these extra settings."""
    clients: list[Client] = []

    def make(**extra: Any) -> Client:
        source = settings(**extra)
        client: Client
        if adapter == "asgi":
            client = ASGIClient(probe, source)
        elif adapter == "wsgi":
            client = WSGIClient(probe, source)
        elif adapter == "flask":
            client = FlaskClient(probe, source)
        else:
            client = DjangoClient(probe, source, "async" if adapter == "django-async" else "sync")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    assert gg.current_context() is None  # never leaks out of a request


def proxy_status(reply: Reply) -> tuple[str, dict[str, Any]]:
    """The one Proxy-Status member, parsed as RFC 8941 says: (member, params)."""
    parsed: Any = http_sf.parse(reply["proxy-status"].encode("ascii"), tltype="list")
    [(item, params)] = parsed
    return str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}


def assert_clean_headers(reply: Reply) -> None:
    for name, value in reply.headers:
        assert "\r" not in name + value and "\n" not in name + value, (name, value)
        assert value.isascii(), (name, value)


def generated_id(reply: Reply) -> str:
    [rid] = reply.all("x-request-id")
    assert GENERATED_ID.fullmatch(rid), rid
    return rid


@dataclass
class Held:
    reply: Reply | None = None


@contextmanager
def holding(client: Client, path: str = "/slow") -> Iterator[Held]:
    """``path`` (a slow view) in flight on another thread until the block ends."""
    held = Held()
    client.probe.entered.clear()
    client.probe.release.clear()

    def run() -> None:
        held.reply = client.request(path)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert client.probe.entered.wait(WAIT), "the slow view never started"
        yield held
    finally:
        client.probe.release.set()
        worker.join(WAIT)
    assert not worker.is_alive()


# --- X-Request-ID -----------------------------------------------------------------------------


def test_a_request_id_is_generated_for_every_request(make_client: MakeClient) -> None:
    client = make_client()
    replies = [client.request("/whoami") for _ in range(5)]
    ids = [generated_id(reply) for reply in replies]
    assert len(set(ids)) == 5
    # The app saw the id it answered with.
    assert [reply.body.decode() for reply in replies] == ids
    assert [rid for rid, _ in client.probe.seen] == ids


def test_a_valid_inbound_request_id_is_echoed_and_reaches_the_upstream(
    make_client: MakeClient,
) -> None:
    client = make_client()
    rid = "req-42.a:b@c/d+e=f"
    reply = client.request("/whoami", headers={"X-Request-ID": rid})
    assert reply.status == 200
    assert reply.all("x-request-id") == [rid]
    assert client.probe.seen == [(rid, client.guard)]  # and current_guard() is this Guard
    reply = client.request("/propagate", headers={"X-Request-ID": rid})
    assert reply.all("x-request-id") == [rid]
    assert client.probe.upstream_ids == [rid]


HOSTILE_IDS = {
    "crlf": b"abc\r\nSet-Cookie: pwned=1",
    "lf": b"abc\nX-Injected: 1",
    "quotes": b'"quoted"',
    "script": b"<script>alert(1)</script>",
    "long": b"a" * 500,
    "utf-8": "caf\u00e9".encode(),
    "latin-1": b"caf\xe9",
    "space": b"a b",
    "empty": b"",
}


@pytest.mark.parametrize("value", HOSTILE_IDS.values(), ids=HOSTILE_IDS.keys())
def test_an_invalid_inbound_request_id_is_replaced(make_client: MakeClient, value: bytes) -> None:
    client = make_client()
    reply = client.request("/whoami", headers={"X-Request-ID": value})
    rid = generated_id(reply)
    assert [seen for seen, _ in client.probe.seen] == [rid]
    assert_clean_headers(reply)


RESPONSES: dict[str, tuple[dict[str, Any], str, int]] = {
    "ok": ({}, "/ok", 200),
    "not found": ({}, "/nowhere", 404),
    "app 500": ({}, "/app/500", 500),
    "app 502": ({}, "/app/502", 502),
    "app 502 branded": ({"brand_app_errors": True}, "/app/502", 502),
    "gateway error": ({}, "/raise/timeout", 504),
    "httpx error": ({}, "/raise/httpx-connect", 502),
    "depends_on": ({"routes": [{"path": "/pay", "depends_on": ["up"]}]}, "/pay", 503),
    "stream": ({}, "/stream", 200),
}


@pytest.mark.parametrize(("extra", "path", "status"), RESPONSES.values(), ids=RESPONSES.keys())
def test_every_response_carries_exactly_one_request_id(
    make_client: MakeClient, extra: dict[str, Any], path: str, status: int
) -> None:
    client = make_client(**extra)
    client.guard.breaker("up").force_open()  # only the depends_on route cares
    reply = client.request(path, headers={"X-Request-ID": "trace-me"})
    assert reply.status == status
    assert reply.all("x-request-id") == ["trace-me"]
    assert GENERATED_ID.fullmatch(generated_id(client.request(path)))


def test_the_apps_own_request_id_wins_and_is_sent_once(make_client: MakeClient) -> None:
    reply = make_client().request("/own-id", headers={"X-Request-ID": "inbound"})
    assert reply.all("x-request-id") == ["from-the-app"]


# --- gateway errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ERRORS)
def test_a_gateway_error_gets_its_status_proxy_status_and_retry_after(
    make_client: MakeClient, kind: str
) -> None:
    _, status, params, retry_after, secret = ERRORS[kind]
    reply = make_client().request(
        f"/raise/{kind}", headers={"Accept": JSON, "X-Request-ID": "rid-1"}
    )
    assert reply.status == status
    # Where the protocol has a reason phrase, it is the status's (clients ignore its case).
    assert reply.reason is None or reply.reason.lower() == HTTPStatus(status).phrase.lower()
    assert proxy_status(reply) == ("shop", params)
    assert reply.get("retry-after") == retry_after
    assert reply["cache-control"] == "no-store"
    assert reply["vary"] == "Accept, Accept-Language"
    assert reply["content-type"] == "application/problem+json"
    assert reply.all("x-request-id") == ["rid-1"]
    assert int(reply["content-length"]) == len(reply.body)
    problem = reply.json()
    assert (problem["status"], problem["instance"]) == (status, "urn:request:rid-1")
    assert problem.get("proxy_error") == params.get("error")
    assert problem.get("retry_after") == (int(retry_after) if retry_after else None)
    assert_clean_headers(reply)
    if secret is not None:  # never the exception's text, upstream addresses included
        assert secret.encode() not in reply.body
        assert secret not in repr(reply.headers)


@pytest.mark.parametrize("kind", ["requests-4xx", "httpx-4xx"])
def test_a_4xx_raise_for_status_stays_the_apps_error(make_client: MakeClient, kind: str) -> None:
    try:
        reply = make_client().request(f"/raise/{kind}", headers={"Accept": JSON})
    except (requests.HTTPError, httpx.HTTPStatusError):
        return  # propagated out of the app untouched: the app's own error
    assert reply.status == 500
    assert reply.get("proxy-status") is None


@pytest.mark.parametrize("accept", [HTML, JSON, "*/*", None], ids=["html", "json", "any", "none"])
def test_the_error_body_follows_the_accept_header(
    make_client: MakeClient, accept: str | None
) -> None:
    headers = {"X-Request-ID": "rid-2"} | ({"Accept": accept} if accept else {})
    reply = make_client().request("/raise/circuit", headers=headers)
    assert reply.status == 503
    assert int(reply["content-length"]) == len(reply.body)
    assert b"rid-2" in reply.body
    content_type = reply["content-type"]
    if accept == HTML:
        assert content_type == "text/html; charset=utf-8"
        page = reply.body.decode()
        assert page.startswith("<!doctype html>") and "<html" in page and "Acme Shop" in page
    elif accept == JSON:
        assert content_type == "application/problem+json"
        problem = reply.json()
        assert problem["proxy_error"] == "destination_unavailable"
        assert problem["retry_after"] == 13
    else:
        assert content_type == "text/plain; charset=utf-8"


def test_head_gets_the_headers_without_a_body(make_client: MakeClient) -> None:
    client = make_client()
    get = client.request("/raise/refused", headers={"Accept": HTML})
    head = client.request("/raise/refused", method="HEAD", headers={"Accept": HTML})
    assert head.status == 502
    assert head.body == b""
    assert int(head["content-length"]) == len(get.body) > 0  # the GET body's length


@pytest.mark.parametrize("accept", [HTML, JSON, "*/*"], ids=["html", "json", "any"])
def test_error_pages_never_show_upstream_details(make_client: MakeClient, accept: str) -> None:
    client = make_client()
    for kind in ("refused", "httpx-connect"):
        reply = client.request(f"/raise/{kind}", headers={"Accept": accept})
        assert reply.status == 502
        everything = reply.body.decode() + repr(reply.headers)
        for secret in ("10.1.2.3", "Errno", "Connection refused"):
            assert secret not in everything


def test_a_guarded_call_that_fails_in_the_view_is_a_gateway_error(make_client: MakeClient) -> None:
    client = make_client()
    reply = client.request("/guarded-fail", headers={"X-Request-ID": "prop-1"})
    assert reply.status == 502
    assert proxy_status(reply) == ("shop", {"received-status": 503})
    # Every attempt (three, the default) carried the request's id.
    assert client.probe.upstream_ids == ["prop-1"] * 3


# --- inbound shedding -------------------------------------------------------------------------

FULL = {"max_concurrent": 1, "max_queue": 0}


def test_a_full_app_sheds_with_503_and_never_sheds_exempt_paths(make_client: MakeClient) -> None:
    client = make_client(shed=FULL)  # the default exempt paths: /healthz and /metrics
    with holding(client) as slow:
        shed = client.request("/ok", headers={"Accept": JSON, "X-Request-ID": "trace-me"})
        assert shed.status == 503
        assert proxy_status(shed) == ("shop", {"error": "connection_limit_reached"})
        assert int(shed["retry-after"]) >= 1
        assert shed.all("x-request-id") == ["trace-me"]
        assert shed["content-type"] == "application/problem+json"
        assert shed.json()["proxy_error"] == "connection_limit_reached"
        generated_id(client.request("/ok"))
        assert client.request("/healthz").status == 200
    assert slow.reply is not None and slow.reply.status == 200
    assert client.request("/ok").status == 200  # the slot came back
    assert client.probe.ran == ["/slow", "/healthz", "/ok"]  # the shed ones never ran


def test_a_queued_request_is_shed_when_its_queue_timeout_passes(make_client: MakeClient) -> None:
    client = make_client(shed={"max_concurrent": 1, "max_queue": 1, "queue_timeout": 0.05})
    with holding(client):
        started = time.monotonic()
        shed = client.request("/ok")
        waited = time.monotonic() - started
    assert shed.status == 503
    assert proxy_status(shed) == ("shop", {"error": "connection_limit_reached"})
    assert 0.04 <= waited < WAIT  # it queued, then gave up
    assert client.request("/ok").status == 200


def test_every_kind_of_response_gives_its_slot_back(make_client: MakeClient) -> None:
    client = make_client(shed=FULL)
    paths = ["/ok", "/raise/timeout", "/raise/httpx-connect", "/app/502", "/nowhere", "/stream"]
    for path in paths:  # with one slot, a leaked one would shed the next request
        assert client.request(path).status != 503, path
    with holding(client):  # and the limit is still one
        assert client.request("/ok").status == 503


# --- dependency-aware shedding ----------------------------------------------------------------


def test_depends_on_answers_503_before_the_view_runs(make_client: MakeClient) -> None:
    client = make_client(routes=[{"path": "/pay", "depends_on": ["up"]}], shed=FULL)
    breaker = client.guard.breaker("up")
    breaker.force_open()
    for _ in range(2):
        reply = client.request("/pay", headers={"Accept": JSON})
        assert reply.status == 503
        assert proxy_status(reply) == ("shop", {"error": "destination_unavailable"})
        assert reply["retry-after"] == "5"  # forced open promises no time: the default
        assert reply.json()["proxy_error"] == "destination_unavailable"
        generated_id(reply)
    # Other routes are unaffected, and the refused requests took no slot of the one.
    assert client.request("/ok").status == 200
    assert client.probe.ran == ["/ok"]
    breaker.reset()
    assert client.request("/pay").body == b"paid"
    assert client.probe.ran == ["/ok", "/pay"]


def test_exempt_paths_are_neither_shed_nor_blocked(make_client: MakeClient) -> None:
    client = make_client(
        shed={**FULL, "exempt": ["/healthz", "/metrics/{rest:path}"]},
        routes=[{"path": "/{rest:path}", "depends_on": ["up"]}],
    )
    breaker = client.guard.breaker("up")
    with holding(client):  # the only slot is taken
        breaker.force_open()
        assert client.request("/healthz").status == 200
        assert client.request("/metrics/app").status == 200
        blocked = client.request("/other")
        assert proxy_status(blocked)[1] == {"error": "destination_unavailable"}
        breaker.reset()
        # The exempt requests took no slot, and gave none back: it is still taken.
        assert proxy_status(client.request("/other"))[1] == {"error": "connection_limit_reached"}
    assert client.probe.ran == ["/slow", "/healthz", "/metrics/app"]


# --- brand_app_errors -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [502, 503, 504])
def test_brand_app_errors_replaces_the_apps_own_error_page(
    make_client: MakeClient, status: int
) -> None:
    client = make_client(brand_app_errors=True)
    html = client.request(f"/app/{status}", headers={"Accept": HTML, "X-Request-ID": "rid-b"})
    assert html.status == status
    assert html["content-type"] == "text/html; charset=utf-8"
    page = html.body.decode()
    assert "Acme Shop" in page and "rid-b" in page
    assert APP_PAGE not in html.body and APP_PAGE[:9] not in html.body  # every chunk gone
    assert proxy_status(html) == ("shop", {})  # ours, naming no upstream failure
    assert html.get("retry-after") == ("5" if status == 503 else None)
    assert html.get("set-cookie") is None  # the app's headers went with its page
    assert html.all("x-request-id") == ["rid-b"]
    assert int(html["content-length"]) == len(html.body)

    api = client.request(f"/app/{status}", headers={"Accept": JSON})
    problem = api.json()
    assert (problem["status"], problem["type"]) == (status, "about:blank")
    assert api.get("retry-after") == ("5" if status == 503 else None)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_brand_app_errors_keeps_the_apps_retry_after(make_client: MakeClient, status: int) -> None:
    # A maintenance page that says "come back in two minutes" must not become "in 5 s".
    client = make_client(brand_app_errors=True)
    reply = client.request(f"/app/{status}/later", headers={"Accept": HTML})
    assert reply.status == status
    assert reply["retry-after"] == "120"
    assert b"Acme Shop" in reply.body
    if status == 503:
        assert b"2 minutes" in reply.body


def test_brand_app_errors_leaves_responses_that_carry_proxy_status(
    make_client: MakeClient,
) -> None:
    client = make_client(brand_app_errors=True)
    explained = client.request("/explained", headers={"Accept": HTML})
    assert (explained.status, explained.body) == (502, b"explained")
    assert explained["proxy-status"] == "shop; error=dns_error"
    # Our own error pages are not re-branded either.
    ours = client.request("/raise/circuit", headers={"Accept": JSON})
    assert proxy_status(ours) == ("shop", {"error": "destination_unavailable"})
    assert ours["retry-after"] == "13"


@pytest.mark.parametrize(
    ("brand", "status"),
    [(False, 502), (False, 503), (False, 504), (True, 500), (True, 404)],
    ids=["off-502", "off-503", "off-504", "on-500", "on-404"],
)
def test_app_responses_are_left_alone_unless_branded(
    make_client: MakeClient, brand: bool, status: int
) -> None:
    client = make_client(brand_app_errors=brand)
    reply = client.request(f"/app/{status}", headers={"X-Request-ID": "r"})
    assert reply.status == status
    assert reply.body == APP_PAGE
    # The app's headers as it set them, plus our id; a framework may add the length.
    headers = [(k, v) for k, v in reply.headers if k != "content-length"]
    assert sorted(headers) == sorted([*APP_HEADERS, ("x-request-id", "r")])


# --- streaming --------------------------------------------------------------------------------


def test_a_streamed_body_passes_through_unbuffered_and_in_order(make_client: MakeClient) -> None:
    client = make_client()
    reply = client.stream("/stream", headers={"X-Request-ID": "s-1"})
    assert reply.status == 200
    assert reply.body == b"".join(CHUNKS)
    assert reply.all("x-request-id") == ["s-1"]
    # Each chunk reached the client before the app produced the next one.
    assert client.probe.events == ["sent 0", "got 0", "sent 1", "got 1", "sent 2", "got 2"]


def test_brand_app_errors_rebrands_a_streamed_502(make_client: MakeClient) -> None:
    client = make_client(brand_app_errors=True)
    reply = client.request("/stream/502", headers={"Accept": HTML, "X-Request-ID": "s-2"})
    assert reply.status == 502
    assert reply["content-type"] == "text/html; charset=utf-8"
    assert b"Acme Shop" in reply.body and b"chunk" not in reply.body
    assert proxy_status(reply) == ("shop", {})
    assert reply.all("x-request-id") == ["s-2"]
