"""GatewayGuardWSGI in-process: an environ dict, a recording start_response, no server.

What every adapter does (request ids, error pages, shedding, re-branding, streaming) is
asserted in test_adapter_contract.py; here is what is WSGI's own: bodies iterated after
the app returned, errors in them, close(), exc_info, write(), PATH_INFO's encoding,
shedding with real threads, logging.

``serve`` plays the server's part of PEP 3333 (iterate, then ``close()``; headers count as
sent with the first non-empty chunk; ``start_response`` may be called again only with
``exc_info`` and only before that) and runs the middleware under ``wsgiref.validate``, so
a protocol slip by the middleware fails the test. Every wait is bounded by ``WAIT``.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from wsgiref.validate import validator

import http_sf
import httpx
import pytest

import gateway_guard as gg

WAIT = 5.0
UPSTREAM_URL = "http://up.test"
TEXT = [("Content-Type", "text/plain")]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


# --- harness ------------------------------------------------------------------------------


def make_guard(**settings: Any) -> gg.Guard:
    base: dict[str, Any] = {"service": "shop", "upstreams": {"up": {"base_url": UPSTREAM_URL}}}
    base.update(settings)
    return gg.Guard(base)


def make_environ(
    path: str = "/", *, method: str = "GET", headers: dict[str, str] | None = None
) -> dict[str, Any]:
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
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


@dataclass
class Response:
    calls: list[tuple[str, list[tuple[str, str]], ExcInfo | None]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    sent: bool = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if self.calls and exc_info is None:
            raise AssertionError("start_response called again without exc_info")
        if exc_info is not None and self.sent:
            raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: too late
        self.calls.append((status, list(headers), exc_info))
        return self.chunks.append

    @property
    def status(self) -> int:
        return int(self.calls[-1][0][:3])

    @property
    def header_list(self) -> list[tuple[str, str]]:
        return self.calls[-1][1]

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.header_list}

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.header_list if k.lower() == name]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def serve(app: WSGIApp, environ: dict[str, Any] | None = None) -> Response:
    """Call ``app`` as a WSGI server would: iterate the body, then always close it."""
    response = Response()
    result = validator(app)(environ or make_environ(), response.start_response)
    try:
        for chunk in result:
            if chunk:
                response.sent = True
            response.chunks.append(chunk)
    finally:
        result.close()  # type: ignore[attr-defined]
    return response


class Body:
    """An app iterable that counts its close() calls and can fail at a chosen chunk."""

    def __init__(
        self,
        chunks: Iterable[bytes] = (b"hello",),
        *,
        fail_at: int | None = None,
        error: BaseException | None = None,
        on_chunk: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = list(chunks)
        self._fail_at = fail_at
        self._error = error
        self._on_chunk = on_chunk
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self._chunks):
            if i == self._fail_at:
                assert self._error is not None
                raise self._error
            if self._on_chunk is not None:
                self._on_chunk()
            yield chunk
        if self._fail_at == len(self._chunks):
            assert self._error is not None
            raise self._error

    def close(self) -> None:
        self.closed += 1


def responding(status: str = "200 OK", body: Body | None = None) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, list(TEXT))
        return body if body is not None else [b"hello"]

    return app


def raising(exc: BaseException) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        raise exc

    return app


def proxy_status(value: str) -> tuple[str, dict[str, Any]]:
    parsed: Any = http_sf.parse(value.encode("ascii"), tltype="list")
    [(item, params)] = parsed
    return str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}


# --- request ids ----------------------------------------------------------------------------


def test_valid_request_id_is_echoed_and_visible_in_the_app_and_its_body() -> None:
    guard = make_guard()
    seen: list[tuple[str, str, gg.Guard]] = []

    def body() -> Iterator[bytes]:
        # A generator runs when the server iterates, after the app returned.
        ctx = gg.current_context()
        assert ctx is not None
        seen.append(("body", ctx.request_id, gg.current_guard()))
        yield b"ok"

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        ctx = gg.current_context()
        assert ctx is not None
        seen.append(("app", ctx.request_id, gg.current_guard()))
        start_response("200 OK", list(TEXT))
        return body()

    response = serve(
        gg.GatewayGuardWSGI(app, guard=guard),
        make_environ(headers={"X-Request-ID": "req-7.a:b@c/d+e=f"}),
    )
    assert response.status == 200
    assert response.all("x-request-id") == ["req-7.a:b@c/d+e=f"]
    assert seen == [("app", "req-7.a:b@c/d+e=f", guard), ("body", "req-7.a:b@c/d+e=f", guard)]
    assert gg.current_context() is None  # reset by close()
    with pytest.raises(LookupError):
        gg.current_guard()


def test_an_error_in_the_body_gets_exactly_one_request_id() -> None:
    # Every other kind of response (and its one id) is in test_adapter_contract.py.
    app = responding(body=Body(fail_at=0, error=gg.UpstreamConnectError("no")))
    response = serve(
        gg.GatewayGuardWSGI(app, guard=make_guard()),
        make_environ(headers={"X-Request-ID": "trace-me"}),
    )
    assert response.status == 502
    assert response.all("x-request-id") == ["trace-me"]


def test_the_apps_headers_list_is_not_mutated() -> None:
    shared = [("Content-Type", "text/plain")]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", shared)
        return [b"ok"]

    mw = gg.GatewayGuardWSGI(app, guard=make_guard())
    serve(mw, make_environ(headers={"X-Request-ID": "alice-request"}))
    bob = serve(mw, make_environ(headers={"X-Request-ID": "bob-request"}))
    assert bob.all("x-request-id") == ["bob-request"]
    assert shared == [("Content-Type", "text/plain")]


# --- generator apps: start_response is called during iteration, not in __call__ -----------


def test_generator_app_gets_request_id_and_context() -> None:
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        ctx = gg.current_context()
        assert ctx is not None
        seen.append(ctx.request_id)
        start_response("200 OK", list(TEXT))
        yield b"ok"

    response = serve(
        gg.GatewayGuardWSGI(app, guard=make_guard()), make_environ(headers={"X-Request-ID": "g1"})
    )
    assert (response.status, response.body, seen) == (200, b"ok", ["g1"])
    assert response.all("x-request-id") == ["g1"]


def test_generator_app_failing_before_start_response_gets_the_error_page() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        with gg.current_guard().client("up", transport=httpx.MockTransport(_refuse)) as c:
            c.get("/x")
        start_response("200 OK", list(TEXT))
        yield b"never"

    response = serve(gg.GatewayGuardWSGI(app, guard=make_guard()))
    assert response.status == 502
    assert proxy_status(response.headers["proxy-status"])[1] == {"error": "connection_refused"}
    assert int(response.headers["content-length"]) == len(response.body)


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def test_brand_app_errors_with_a_generator_app() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("503 Service Unavailable", list(TEXT))
        yield b"app body"

    guard = make_guard(brand_app_errors=True)
    response = serve(
        gg.GatewayGuardWSGI(app, guard=guard), make_environ(headers={"Accept": "text/html"})
    )
    assert response.status == 503
    assert int(response.headers["content-length"]) == len(response.body)
    assert b"app body" not in response.body


# --- upstream errors ----------------------------------------------------------------------


@pytest.mark.parametrize("first", [None, b""], ids=["raises-at-once", "after-empty-chunk"])
def test_error_in_the_body_before_the_first_chunk_becomes_an_error_page(
    first: bytes | None,
) -> None:
    error = gg.UpstreamTimeout("slow", proxy_error="connection_read_timeout", upstream="up")
    body = Body(
        [first] if first is not None else [], fail_at=1 if first is not None else 0, error=error
    )
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0})
    response = serve(
        gg.GatewayGuardWSGI(responding(body=body), guard=guard),
        make_environ(headers={"X-Request-ID": "rid-b"}),
    )
    # The app's 200, then ours with exc_info: allowed, no header had gone out yet.
    # The app's 200 was held back, never sent: the server sees only the error page.
    [(status, _, exc_info)] = response.calls
    assert status == "504 Gateway Timeout"
    assert exc_info is not None and exc_info[1] is error
    assert proxy_status(response.headers["proxy-status"])[1] == {"error": "connection_read_timeout"}
    assert response.all("x-request-id") == ["rid-b"]
    assert b"rid-b" in response.body
    assert body.closed == 1
    assert guard.shedding.app.in_flight == 0


def test_error_in_the_body_after_the_first_chunk_is_reraised_after_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    error = gg.UpstreamProtocolError("cut", proxy_error="connection_terminated", upstream="up")
    body = Body([b"part one", b"part two"], fail_at=1, error=error)
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0})
    mw = gg.GatewayGuardWSGI(responding(body=body), guard=guard)

    response = Response()
    result = validator(mw)(make_environ(), response.start_response)
    iterator = iter(result)
    assert next(iterator) == b"part one"
    with pytest.raises(gg.UpstreamProtocolError) as info:
        next(iterator)
    assert info.value is error
    result.close()  # type: ignore[attr-defined]

    assert len(response.calls) == 1  # no second start_response
    records = [r for r in caplog.records if r.name == "gateway_guard"]
    assert len(records) == 1
    assert records[0].response_started is True  # type: ignore[attr-defined]
    assert body.closed == 1
    assert guard.shedding.app.in_flight == 0


@pytest.mark.parametrize(
    ("exc", "status", "proxy_error"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), 502, "connection_refused"),
        (httpx.ReadTimeout("timed out"), 504, "connection_read_timeout"),
    ],
    ids=["connect", "read-timeout"],
)
def test_uncaught_httpx_transport_error_in_the_body_is_classified(
    exc: httpx.TransportError, status: int, proxy_error: str
) -> None:
    # Raised by the app itself: test_adapter_contract.py.
    app = responding(body=Body(fail_at=0, error=exc))
    response = serve(gg.GatewayGuardWSGI(app, guard=make_guard()))
    assert response.status == status
    assert proxy_status(response.headers["proxy-status"]) == ("shop", {"error": proxy_error})
    assert b"Errno" not in response.body and b"timed out" not in response.body


@pytest.mark.parametrize("where", ["app", "body"])
def test_non_upstream_exception_propagates_unchanged_and_releases(where: str) -> None:
    exc = ValueError("not ours")
    body = Body(fail_at=0, error=exc)
    app = raising(exc) if where == "app" else responding(body=body)
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0})
    with pytest.raises(ValueError, match="not ours") as info:
        serve(gg.GatewayGuardWSGI(app, guard=guard))
    assert info.value is exc
    assert guard.shedding.app.in_flight == 0
    assert gg.current_context() is None
    if where == "body":
        assert body.closed == 1


# --- close() and the shedding slot ----------------------------------------------------------


def test_close_releases_the_slot_and_closes_the_apps_iterable_once() -> None:
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0})
    limiter = guard.shedding.app
    in_flight: list[int] = []
    body = Body([b"a", b"b"], on_chunk=lambda: in_flight.append(limiter.in_flight))
    mw = gg.GatewayGuardWSGI(responding(body=body), guard=guard)

    response = Response()
    result = mw(make_environ(), response.start_response)
    assert limiter.in_flight == 1  # held after the app returned, while the body is pending
    assert list(result) == [b"a", b"b"]
    assert in_flight == [1, 1]
    assert limiter.in_flight == 1  # ... and after iteration, until close()
    result.close()  # type: ignore[attr-defined]
    assert (limiter.in_flight, body.closed) == (0, 1)
    assert serve(mw).status == 200  # the slot really is free


def test_brand_app_errors_replaces_the_apps_own_503_and_closes_its_body() -> None:
    guard = make_guard(brand_app_errors=True, brand={"name": "Acme Shop"})
    body = Body([b"app's own ", b"503 body"])
    written: list[bytes] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        write = start_response(
            "503 Service Unavailable", [*TEXT, ("Retry-After", "120"), ("Set-Cookie", "s=1")]
        )
        write(b"legacy write() data")
        written.append(b"done")
        return body

    response = serve(
        gg.GatewayGuardWSGI(app, guard=guard),
        make_environ(headers={"Accept": "text/html", "X-Request-ID": "rid-c"}),
    )
    assert response.status == 503
    assert len(response.calls) == 1
    assert b"app's own" not in response.body and b"legacy" not in response.body
    assert b"Acme Shop" in response.body and b"rid-c" in response.body
    headers = response.headers
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["retry-after"] == "120"  # the app's own promise is kept
    assert "set-cookie" not in headers
    assert proxy_status(headers["proxy-status"]) == ("shop", {})
    assert response.all("x-request-id") == ["rid-c"]
    assert body.closed == 1 and written == [b"done"]


@pytest.mark.parametrize(
    ("brand", "status"),
    [(False, "503 Service Unavailable"), (True, "500 Internal Server Error")],
    ids=["off", "500"],
)
def test_app_responses_are_left_alone_unless_branded(brand: bool, status: str) -> None:
    body = Body([b"the app's ", b"body"])
    response = serve(
        gg.GatewayGuardWSGI(responding(status, body), guard=make_guard(brand_app_errors=brand)),
        make_environ(headers={"X-Request-ID": "r"}),
    )
    assert response.calls[0][0] == status
    assert response.body == b"the app's body"
    assert response.header_list == [*TEXT, ("X-Request-ID", "r")]
    assert body.closed == 1


# --- depends_on and routes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_info", "blocked"),
    [
        # PEP 3333: PATH_INFO carries the raw (percent-decoded) bytes as latin-1.
        ("/caf\u00e9/1".encode().decode("latin-1"), True),
        ("/cafe/1", False),
        ("/caf\xff/1", False),  # not UTF-8: no match, and no crash
    ],
    ids=["utf-8-route", "ascii-other", "invalid-utf-8"],
)
def test_non_ascii_path_info_matches_a_utf8_route(path_info: str, blocked: bool) -> None:
    guard = make_guard(routes=[{"path": "/caf\u00e9/{item}", "depends_on": ["up"]}])
    guard.breaker("up").force_open()
    response = serve(gg.GatewayGuardWSGI(responding(), guard=guard), make_environ(path_info))
    assert response.status == (503 if blocked else 200)


def test_shedding_with_real_threads_admits_exactly_max_concurrent() -> None:
    guard = make_guard(shed={"max_concurrent": 4, "max_queue": 0})
    release = threading.Event()
    admitted: list[str] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] != "/healthz":
            admitted.append(environ["PATH_INFO"])
            if not release.wait(WAIT):
                raise AssertionError("never released")
        start_response("200 OK", list(TEXT))
        return [b"ok"]

    mw = gg.GatewayGuardWSGI(app, guard=guard)
    results: queue.Queue[tuple[Response, float]] = queue.Queue()

    def client(i: int) -> None:
        t0 = time.monotonic()
        response = serve(mw, make_environ(f"/work/{i}"))
        results.put((response, time.monotonic() - t0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    try:
        for thread in threads:
            thread.start()
        shed = [results.get(timeout=WAIT) for _ in range(12)]
        # Twelve answered while the four admitted are still blocked.
        assert not release.is_set()
        assert len(admitted) == 4
        for response, elapsed in shed:
            assert response.status == 503
            assert proxy_status(response.headers["proxy-status"])[1] == {
                "error": "connection_limit_reached"
            }
            assert int(response.headers["retry-after"]) >= 1
            assert elapsed < WAIT / 2  # the admitted ones hold their slots for up to WAIT
        assert serve(mw, make_environ("/healthz")).status == 200
        assert guard.shedding.app.in_flight == 4
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)
    rest = [results.get(timeout=WAIT) for _ in range(4)]
    assert [r.status for r, _ in rest] == [200] * 4
    assert not any(t.is_alive() for t in threads)
    assert guard.shedding.app.in_flight == 0


# --- logging and construction -----------------------------------------------------------------


def test_one_log_record_per_gateway_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    guard = make_guard(routes=[{"path": "/orders/{id}", "name": "orders"}])
    error = gg.UpstreamStatusError("500", upstream="up", received_status=500, attempts=1)
    serve(
        gg.GatewayGuardWSGI(raising(error), guard=guard),
        make_environ("/orders/1", headers={"X-Request-ID": "log-w"}),
    )
    [record] = [r for r in caplog.records if r.name == "gateway_guard"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert (
        record.request_id,  # type: ignore[attr-defined]
        record.route,  # type: ignore[attr-defined]
        record.upstream,  # type: ignore[attr-defined]
        record.proxy_error,  # type: ignore[attr-defined]
        record.status,  # type: ignore[attr-defined]
        record.received_status,  # type: ignore[attr-defined]
        record.attempts,  # type: ignore[attr-defined]
    ) == ("log-w", "orders", "up", None, 502, 500, 1)
    assert "received-status=500" in record.getMessage()


def test_guard_or_settings_but_not_both() -> None:
    guard = make_guard()
    assert gg.GatewayGuardWSGI(responding(), guard=guard).guard is guard
    assert (
        gg.GatewayGuardWSGI(responding(), settings={"service": "w"}).guard.settings.service == "w"
    )
    with pytest.raises(TypeError, match="not both"):
        gg.GatewayGuardWSGI(responding(), guard=guard, settings={"service": "w"})


class _GeventLikeTimeout(BaseException):
    """Like gevent's Timeout: a BaseException, so ``except Exception`` lets it through."""


@pytest.mark.parametrize("error", [SystemExit(1), KeyboardInterrupt(), _GeventLikeTimeout()])
@pytest.mark.parametrize("where", ["app", "body"])
def test_a_base_exception_releases_the_slot_exactly_once(error: BaseException, where: str) -> None:
    guard = make_guard(shed={"max_concurrent": 3, "max_queue": 0})
    body = Body(fail_at=0, error=error)
    mw = gg.GatewayGuardWSGI(
        raising(error) if where == "app" else responding(body=body), guard=guard
    )
    for _ in range(3):
        with pytest.raises(type(error)):
            serve(mw)
        assert guard.shedding.app.in_flight == 0
        assert gg.current_context() is None
    assert serve(gg.GatewayGuardWSGI(responding(), guard=guard)).status == 200
    assert guard.shedding.app.in_flight == 0
