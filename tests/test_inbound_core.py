"""The inbound core's decisions (gateway_guard.inbound), and the adapter behaviours that
follow from owning them in one place: Django re-brands a streamed 502/503/504 like the
other adapters, and Flask lets Flask choose which error handler answers a gateway error.
"""

from __future__ import annotations

import asyncio
import io
import sys
import types
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import pytest
from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.test import RequestFactory, override_settings
from flask import Blueprint, Flask
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadGateway, HTTPException
from werkzeug.test import TestResponse

import gateway_guard as gg

# Django is configured once per process (django_setup.py, imported by test_django.py,
# which is also the URLconf these tests use): imported so this module runs alone, or first.
import test_django  # noqa: F401
from gateway_guard.context import RequestContext
from gateway_guard.django import GatewayGuardMiddleware
from gateway_guard.flask import GatewayGuard, UpstreamHTTPError, UpstreamServiceUnavailable
from gateway_guard.headers import format_retry_after
from gateway_guard.inbound import (
    REQUEST_ID,
    AppError,
    admit,
    admit_async,
    handler_headers,
    on_response_start,
    release,
    respond,
    start,
    try_admit,
)
from gateway_guard.inbound._ids import WATCH


def make_guard(**settings: Any) -> gg.Guard:
    return gg.Guard({"service": "shop", "upstreams": {"up": {}}, **settings})


@pytest.fixture(autouse=True)
def _no_leaked_context() -> Iterator[None]:
    yield
    assert gg.current_context() is None  # every adapter resets it after its request


def read(headers: dict[str, str], name: str) -> str | None:
    """A FieldReader over a plain dict, case-insensitive as the protocol asks."""
    for field, value in headers.items():
        if field.lower() == name:
            return value
    return None


# --- start: exempt, route, request id ----------------------------------------------------------


def test_start_echoes_a_valid_request_id_and_replaces_a_bad_one() -> None:
    guard = make_guard()
    assert start(guard, "GET", "/", b"abc-1", None).request_id == "abc-1"
    generated = start(guard, "GET", "/", "bad id with spaces", None).request_id
    assert generated != "bad id with spaces" and len(generated) == 32


def test_start_marks_exempt_paths_and_blocked_routes() -> None:
    guard = make_guard(
        shed={"exempt": ["/healthz"]}, routes=[{"path": "/pay", "depends_on": ["up"]}]
    )
    assert start(guard, "GET", "/healthz", None, None).exempt
    assert start(guard, "GET", "/pay", None, None).blocked is None
    guard.breaker("up").force_open()
    blocked = start(guard, "GET", "/pay", None, None).blocked
    assert isinstance(blocked, gg.CircuitOpenError) and blocked.upstream == "up"


def _no_id_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a process that imported neither id library (another test module may have)."""
    for name in ("asgi_correlation_id.context", "django_guid.context"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(WATCH, "idle", -1)
    monkeypatch.setattr(WATCH, "seen", -1)
    monkeypatch.setattr(WATCH, "libraries", ())


@pytest.mark.parametrize("path", ["/", "/pay", "/healthz"])
def test_start_sets_every_slot_as_the_constructor_would(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() fills the context without RequestContext.__init__ (a frame fewer): a slot
    # the constructor sets must not be missed, nor get another default.
    _no_id_libraries(monkeypatch)
    guard = make_guard(
        shed={"exempt": ["/healthz"]},
        routes=[{"path": "/pay", "deadline": 5, "priority": "critical"}],
    )
    for admit_now in (False, True):
        ctx = start(guard, "POST", path, "rid-1", None, admit_now)
        built = RequestContext(
            guard,
            "rid-1",
            ctx.route,
            ctx.deadline_at,
            None,
            ctx.started,
            ctx.exempt,
            None,
            None,
            "POST",
            path,
            guard.settings.debug,  # a middleware records calls for debug mode only
        )
        for slot in RequestContext.__slots__:
            expected = getattr(built, slot)
            if slot == "admitted":
                expected = admit_now and not ctx.exempt
            assert getattr(ctx, slot) == expected, slot
        release(ctx)
    assert guard.shedding.app.in_flight == 0


def test_start_admit_now_takes_only_a_free_slot_the_request_needs() -> None:
    guard = make_guard(
        shed={"max_concurrent": 1, "max_queue": 0, "exempt": ["/healthz"]},
        routes=[{"path": "/pay", "depends_on": ["up"]}],
    )
    first = start(guard, "GET", "/", None, None, True)
    assert first.admitted and guard.shedding.app.in_flight == 1
    full = start(guard, "GET", "/", None, None, True)
    assert not full.admitted and not try_admit(full)  # the adapter goes on to admit_async
    exempt = start(guard, "GET", "/healthz", None, None, True)
    assert not exempt.admitted and try_admit(exempt)  # runs without a slot
    release(first)
    guard.breaker("up").force_open()
    blocked = start(guard, "GET", "/pay", None, None, True)
    assert not blocked.admitted and not try_admit(blocked)
    assert admit(blocked) is blocked.blocked
    for ctx in (full, exempt, blocked):
        release(ctx)
    assert guard.shedding.app.in_flight == 0


def test_inbound_events_nobody_hears_are_never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def unheard(route: str | None) -> None:
        raise AssertionError("built an event no hook hears")

    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0})
    ended: list[gg.events.Event] = []
    guard.on(gg.events.CallEnded, ended.append)  # a hook, but not on the inbound events
    for name in ("InboundAdmitted", "InboundReleased", "InboundShed"):
        monkeypatch.setattr(f"gateway_guard.inbound._admission.{name}", unheard)
    ctx = start(guard, "GET", "/", None, None, True)
    assert ctx.admitted and isinstance(
        admit(start(guard, "GET", "/", None, None)), gg.LoadShedError
    )
    release(ctx)
    monkeypatch.undo()
    heard: list[gg.events.Event] = []
    guard.on(gg.events.InboundReleased, heard.append)
    ctx = start(guard, "GET", "/", None, None, True)
    release(ctx)
    assert [type(e).__name__ for e in heard] == ["InboundReleased"] and not ended


def test_an_id_library_loaded_after_the_first_requests_is_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The libraries are looked up again whenever sys.modules changes size: one imported
    # late (a lazily built sub-app) is seen from the next request on.
    _no_id_libraries(monkeypatch)
    guard = make_guard()
    assert start(guard, "GET", "/", None, None).foreign_id is None
    assert WATCH.idle == len(sys.modules)  # no library: one compare a request from now on
    late = types.ModuleType("asgi_correlation_id.context")
    var: ContextVar[str | None] = ContextVar("correlation_id", default=None)
    late.correlation_id = var  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "asgi_correlation_id.context", late)
    token = var.set("outer-id-1")
    try:
        ctx = start(guard, "GET", "/", None, None)
    finally:
        var.reset(token)
    assert ctx.request_id == "outer-id-1" and ctx.foreign_id is not None
    assert on_response_start(ctx, 200, {}, read) is None  # the library answers the header
    release(ctx)
    monkeypatch.delitem(sys.modules, "asgi_correlation_id.context")
    assert start(guard, "GET", "/", None, None).foreign_id is None  # gone again


# --- admission and release ---------------------------------------------------------------------


def test_admit_then_release_exactly_once() -> None:
    guard = make_guard(shed={"max_concurrent": 2})
    ctx = start(guard, "GET", "/", None, None)
    assert admit(ctx) is None
    assert guard.shedding.app.in_flight == 1
    release(ctx)
    release(ctx)  # a second release gives back nothing
    assert guard.shedding.app.in_flight == 0


def test_exempt_requests_take_no_slot() -> None:
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0, "exempt": ["/healthz"]})
    guard.shedding.app.acquire()  # full
    ctx = start(guard, "GET", "/healthz", None, None)
    assert try_admit(ctx) and admit(ctx) is None
    release(ctx)
    assert guard.shedding.app.in_flight == 1  # only the slot taken above


def test_a_full_app_sheds_with_a_503_naming_no_upstream() -> None:
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 0})
    guard.shedding.app.acquire()
    ctx = start(guard, "GET", "/", None, None)
    assert not try_admit(ctx)
    refusals = [admit(ctx), asyncio.run(admit_async(ctx))]
    for refusal in refusals:
        assert isinstance(refusal, gg.LoadShedError) and refusal.upstream is None
    release(ctx)  # nothing was taken: nothing is given back
    assert guard.shedding.app.in_flight == 1


def test_a_blocked_route_is_refused_before_shedding() -> None:
    guard = make_guard(routes=[{"path": "/pay", "depends_on": ["up"]}])
    guard.breaker("up").force_open()
    ctx = start(guard, "GET", "/pay", None, None)
    assert not try_admit(ctx)
    assert admit(ctx) is ctx.blocked
    assert asyncio.run(admit_async(ctx)) is ctx.blocked
    assert guard.shedding.app.in_flight == 0


def test_admit_async_admits_after_the_fast_path_says_wait() -> None:
    guard = make_guard(shed={"max_concurrent": 1, "max_queue": 1, "queue_timeout": 5})
    guard.shedding.app.acquire()
    ctx = start(guard, "GET", "/", None, None)
    assert not try_admit(ctx)

    async def wait_then_free() -> gg.UpstreamError | None:
        waiting = asyncio.ensure_future(admit_async(ctx))
        await asyncio.sleep(0)
        guard.shedding.app.release()
        return await waiting

    assert asyncio.run(wait_then_free()) is None and ctx.admitted
    release(ctx)
    assert guard.shedding.app.in_flight == 0


# --- the app's response ------------------------------------------------------------------------


def test_the_request_id_is_added_unless_the_app_set_one_in_any_case() -> None:
    ctx = start(make_guard(), "GET", "/", "rid-1", None)
    assert on_response_start(ctx, 200, {}, read) == "rid-1"
    assert REQUEST_ID == "X-Request-ID"
    for name in ("x-request-id", "X-Request-ID", "X-REQUEST-ID"):
        assert on_response_start(ctx, 200, {name: "theirs"}, read) is None


@pytest.mark.parametrize("status", [502, 503, 504])
def test_brand_app_errors_replaces_the_apps_own_gateway_statuses(status: int) -> None:
    ctx = start(make_guard(brand_app_errors=True), "GET", "/", "rid-1", None)
    decision = on_response_start(ctx, status, {"Retry-After": "30"}, read)
    assert isinstance(decision, AppError)
    assert (decision.status, decision.retry_after) == (status, 30.0)
    page = respond(ctx, decision, "application/json", "GET")
    assert page.status == status and ("retry-after", "30") in page.headers
    assert ("x-request-id", "rid-1") in page.headers


def test_what_is_never_re_branded() -> None:
    branding = start(make_guard(brand_app_errors=True), "GET", "/", "r", None)
    plain = start(make_guard(), "GET", "/", "r", None)
    # A response that explains itself, in any case of the name.
    assert on_response_start(branding, 503, {"proxy-status": "shop"}, read) == "r"
    assert on_response_start(branding, 503, {"Proxy-Status": "x", REQUEST_ID: "a"}, read) is None
    assert on_response_start(branding, 500, {}, read) == "r"  # not a gateway status
    assert on_response_start(plain, 503, {}, read) == "r"  # brand_app_errors off


def test_a_handler_response_gets_proxy_status_always_and_retry_after_on_5xx() -> None:
    ctx = start(make_guard(), "GET", "/", None, None)
    page = respond(ctx, gg.CircuitOpenError("open", upstream="up", retry_after=12.2), None, "GET")
    proxy_status = dict(page.headers)["proxy-status"]
    assert handler_headers(page, 503, {}, read) == [
        ("Proxy-Status", proxy_status),
        ("Retry-After", "13"),
    ]
    assert handler_headers(page, 200, {}, read) == [("Proxy-Status", proxy_status)]
    # What the handler set is never changed.
    assert handler_headers(page, 503, {"proxy-status": "mine", "RETRY-AFTER": "60"}, read) == []


# --- Django: a streamed 502/503/504 is re-branded, its body closed unread ----------------------


class Body:
    """A streamed body that records whether it was read and closed."""

    def __init__(self) -> None:
        self.read = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield b"the app's own stream"

    def close(self) -> None:
        self.closed = True


DJANGO_GG = {"service": "shop", "brand_app_errors": True, "upstreams": {"up": {}}}


def django_call(response: HttpResponseBase, mode: str) -> HttpResponseBase:
    request = RequestFactory().get("/stream", headers={"Accept": "text/html"})
    if mode == "sync":
        return GatewayGuardMiddleware(lambda r: response)(request)  # type: ignore[return-value]

    async def get_response(r: HttpRequest) -> HttpResponseBase:
        return response

    async def go() -> HttpResponseBase:
        return await GatewayGuardMiddleware(get_response)(request)  # type: ignore[no-any-return, misc]

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_re_brands_a_streamed_gateway_status_and_closes_it_unread(mode: str) -> None:
    body = Body()
    with override_settings(GATEWAY_GUARD=DJANGO_GG):
        streamed = StreamingHttpResponse(body, status=503, headers={"Retry-After": "9"})
        response = django_call(streamed, mode)
    assert response.status_code == 503 and not response.streaming
    assert response.has_header("Proxy-Status") and response["Retry-After"] == "9"
    assert b"the app's own stream" not in response.content
    assert (body.read, body.closed) == (False, True)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_re_brands_a_file_response_and_closes_the_file(mode: str) -> None:
    file = io.BytesIO(b"the app's own file")
    with override_settings(GATEWAY_GUARD=DJANGO_GG):
        response = django_call(FileResponse(file, status=502), mode)
    assert response.status_code == 502 and response.has_header("Proxy-Status")
    assert file.closed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_streams_success_unbuffered_and_non_gateway_statuses_as_they_are(
    mode: str,
) -> None:
    with override_settings(GATEWAY_GUARD=DJANGO_GG):
        for status in (200, 500):
            body = Body()
            streamed = StreamingHttpResponse(body, status=status)
            response = django_call(streamed, mode)
            assert response is streamed and response.has_header(REQUEST_ID)
            assert (body.read, body.closed) == (False, False)  # untouched until served
        plain = django_call(
            HttpResponse("explained", status=503, headers={"Proxy-Status": "x"}), mode
        )
        assert plain.content == b"explained"


# --- Flask: Flask chooses the error handler ----------------------------------------------------


class BufferedClient(FlaskClient):
    """Reads the whole response and closes it at once, as a WSGI server does: the request
    context and the shedding slot end in ``close()``."""

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def guarded(app: Flask) -> Flask:
    app.test_client_class = BufferedClient
    app.config["GATEWAY_GUARD"] = {"service": "shop", "upstreams": {"up": {}}}
    GatewayGuard(app)
    return app


def flask_app(*, raises: Exception | None = None) -> Flask:
    app = guarded(Flask("precedence"))
    error = raises or gg.UpstreamConnectError("refused", upstream="up")

    @app.get("/boom")
    def boom() -> ResponseReturnValue:
        raise error

    return app


def test_flask_catch_all_http_exception_handler_now_receives_gateway_errors() -> None:
    app = flask_app(raises=gg.CircuitOpenError("open", upstream="up", retry_after=4.5))
    received: list[HTTPException] = []

    @app.errorhandler(HTTPException)
    def any_http_error(e: HTTPException) -> ResponseReturnValue:
        received.append(e)
        return f"generic {e.code}", e.code or 500

    response = app.test_client().get("/boom")
    [e] = received
    assert isinstance(e, UpstreamServiceUnavailable) and isinstance(e.error, gg.CircuitOpenError)
    assert (response.status_code, response.data) == (503, b"generic 503")
    # The core's fields for a handler's response: Proxy-Status always, Retry-After on a 5xx.
    assert "destination_unavailable" in response.headers["Proxy-Status"]
    assert response.headers["Retry-After"] == "5"
    assert response.headers.getlist("X-Request-ID")  # from the WSGI layer, once


def test_flask_exception_handler_receives_gateway_errors_as_it_does_any_http_error() -> None:
    app = flask_app()
    app.register_error_handler(Exception, lambda e: (type(e).__name__, 500))
    response = app.test_client().get("/boom")
    assert (response.status_code, response.data) == (500, b"UpstreamBadGateway")
    assert "Retry-After" not in response.headers and "Proxy-Status" in response.headers


def test_flask_picks_the_same_handler_as_for_a_werkzeug_bad_gateway() -> None:
    # A code handler on the app beats a class handler on the blueprint (Flask's order).
    app = guarded(Flask("same"))
    bp = Blueprint("bp", __name__)

    @bp.get("/ours")
    def ours() -> ResponseReturnValue:
        raise gg.UpstreamConnectError("refused", upstream="up")

    @bp.get("/werkzeug")
    def werkzeug_one() -> ResponseReturnValue:
        raise BadGateway()

    bp.register_error_handler(HTTPException, lambda e: ("blueprint class handler", 502))
    app.register_error_handler(502, lambda e: ("app code handler", 502))
    app.register_blueprint(bp)
    client = app.test_client()
    assert client.get("/werkzeug").data == b"app code handler"
    assert client.get("/ours").data == b"app code handler"


def test_flask_asks_the_apps_own_handle_http_exception() -> None:
    class Custom(Flask):
        def handle_http_exception(self, e: HTTPException) -> Any:
            return f"custom {e.code}", e.code

    app = guarded(Custom("custom"))

    @app.get("/boom")
    def boom() -> ResponseReturnValue:
        raise gg.UpstreamTimeout("slow", upstream="up")

    response = app.test_client().get("/boom")
    assert (response.status_code, response.data) == (504, b"custom 504")
    assert "Proxy-Status" in response.headers


def test_flask_without_a_handler_and_a_handler_returning_e_give_the_branded_page() -> None:
    page = flask_app().test_client().get("/boom", headers={"Accept": "application/json"})
    app = flask_app()
    app.register_error_handler(UpstreamHTTPError, lambda e: e)
    again = app.test_client().get("/boom", headers={"Accept": "application/json"})
    for response in (page, again):
        assert response.status_code == 502
        assert response.content_type == "application/problem+json"
        assert len(response.headers.getlist("X-Request-ID")) == 1


@pytest.mark.parametrize("seconds", [0.0, 0.2, 12.2, 86400.5, float("inf")])
def test_werkzeug_retry_after_uses_the_headers_rounding(seconds: float) -> None:
    error = gg.CircuitOpenError("open", retry_after=seconds)
    assert UpstreamServiceUnavailable(error).retry_after == int(format_retry_after(seconds))
