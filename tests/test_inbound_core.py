"""The inbound core's decisions (gateway_guard.inbound), and the adapter behaviours that
follow from owning them in one place: Django re-brands a streamed 502/503/504 like the
other adapters.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import pytest
from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.test import RequestFactory, override_settings

import gateway_guard as gg

# Django is configured once per process, by test_django.py (it is also the URLconf):
# imported so that this module runs alone, or first, with the same settings.
import test_django  # noqa: F401
from gateway_guard.django import GatewayGuardMiddleware
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
