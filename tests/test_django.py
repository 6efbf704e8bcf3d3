"""The Django adapter: system checks, settings, middleware (sync and async), @gateway_policy.

Request ids, error pages, shedding, re-branding and streaming, which every adapter does
alike, are asserted in test_adapter_contract.py (Django's sync and async modes included).

Django is configured once for this test process, in django_setup.py (the adapter contract
suite uses Django too); this module is the project's URLconf. In-process tests go
through Django's test clients, both the sync ``Client`` (WSGI-style handler, the
middleware in sync mode) and ``AsyncClient`` (ASGI-style handler, the middleware in async
mode): the ``fetch`` fixture runs each such test once per mode. End-to-end tests serve the
project with Django's real handlers: ``WSGIHandler`` on cheroot and ``ASGIHandler`` on
uvicorn, against the real misbehaving upstream. Everything listens on 127.0.0.1, and every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import http_sf
import httpx
import pytest
from asgiref.sync import iscoroutinefunction
from django.core.checks import CheckMessage, run_checks
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.test import AsyncClient, Client, RequestFactory, override_settings
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View

import gateway_guard as gg
from django_setup import BRAND, MIDDLEWARE, gg_settings
from gateway_guard.django import GatewayGuardMiddleware, gateway_policy, get_guard
from gateway_guard.django.checks import check_middleware, check_settings, check_view_policies
from gateway_guard.django.decorators import PolicySpec, registered_policies
from gateway_guard.inbound import log_gateway_error
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_asgi, serve_wsgi

WAIT = 5.0
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
INNER = f"{__name__}.InnerMiddleware"
SECURITY = "django.middleware.security.SecurityMiddleware"


# --- the project: views and an inner middleware ---------------------------------------------

RAN: collections.Counter[str] = collections.Counter()
PULLED: list[int] = []


def _answer(response: httpx.Response) -> dict[str, Any]:
    echo = response.json()
    return {"upstream_saw": echo["headers"].get("x-request-id"), "n": echo["request_number"]}


def items(request: HttpRequest) -> JsonResponse:
    RAN["items"] += 1
    with get_guard().client("up") as client:
        return JsonResponse(_answer(client.get("/items")))


async def async_items(request: HttpRequest) -> JsonResponse:
    RAN["async_items"] += 1
    async with get_guard().async_client("up") as client:
        return JsonResponse(_answer(await client.get("/items")))


@gateway_policy(retry={"attempts": 1})
def one_attempt(request: HttpRequest) -> JsonResponse:
    return items(request)


@gateway_policy(retry={"attempts": 1})
async def one_attempt_async(request: HttpRequest) -> JsonResponse:
    return await async_items(request)


@gateway_policy(depends_on=["up"])
def needs_up(request: HttpRequest) -> HttpResponse:
    RAN["needs_up"] += 1
    return HttpResponse("ran")


@gateway_policy(depends_on=["up"])
async def needs_up_async(request: HttpRequest) -> HttpResponse:
    RAN["needs_up_async"] += 1
    return HttpResponse("ran")


def handled(request: HttpRequest) -> HttpResponse:
    try:
        with get_guard().client("up") as client:
            client.get("/items")
    except gg.UpstreamError:
        return HttpResponse("the app's own fallback")
    return HttpResponse("upstream ok")


RAISES: dict[str, Callable[[], Exception]] = {
    "circuit": lambda: gg.CircuitOpenError("breaker open", upstream="up", retry_after=7),
    "timeout": lambda: gg.UpstreamTimeout(
        "too slow", proxy_error="connection_read_timeout", upstream="up"
    ),
    "httpx": lambda: httpx.ReadTimeout("read timed out"),
    "value": lambda: ValueError("a bug in the app"),
}


def raises(request: HttpRequest, kind: str) -> HttpResponse:
    raise RAISES[kind]()


async def raises_async(request: HttpRequest, kind: str) -> HttpResponse:
    raise RAISES[kind]()


def whoami(request: HttpRequest) -> JsonResponse:
    ctx = gg.current_context()
    assert ctx is not None
    return JsonResponse({"request_id": ctx.request_id, "same": gg.current_guard() is get_guard()})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def body() -> Iterator[bytes]:
        for i in range(3):
            PULLED.append(i)
            yield f"chunk {i}\n".encode()

    return StreamingHttpResponse(body(), content_type="text/plain", status=_status(request))


async def astream(request: HttpRequest) -> StreamingHttpResponse:
    # An async iterator: Django's ASGI handler warns about (and buffers) sync ones.
    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            PULLED.append(i)
            yield f"chunk {i}\n".encode()

    return StreamingHttpResponse(body(), content_type="text/plain", status=_status(request))


def _status(request: HttpRequest) -> int:
    return int(request.GET.get("status", "200"))


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


class CartView(View):
    @method_decorator(gateway_policy(retry={"attempts": 1}))
    def get(self, request: HttpRequest) -> JsonResponse:
        return items(request)


urlpatterns = [
    path("api/items", items),
    path("async/items", async_items),
    path("policy/one", one_attempt),
    path("policy/one-async", one_attempt_async),
    path("policy/needs-up", needs_up),
    path("policy/needs-up-async", needs_up_async),
    path("handled", handled),
    path("raise/<str:kind>", raises),
    path("araise/<str:kind>", raises_async),
    path("whoami", whoami),
    path("stream", stream),
    path("astream", astream),
    path("healthz", healthz),
    path("policy/cbv", CartView.as_view()),
    path("mw-fail", healthz),  # InnerMiddleware fails before this runs
    path("mw-handles", raises, {"kind": "timeout"}),
]


class InnerMiddleware:
    """A project middleware below ours: fails on /mw-fail, handles view errors on /mw-handles."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            from asgiref.sync import markcoroutinefunction

            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if request.path_info == "/mw-fail":
            # Say, an auth middleware whose session service timed out.
            raise gg.UpstreamTimeout(
                "session service", proxy_error="connection_read_timeout", upstream="up"
            )
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> Any:
        if request.path_info == "/mw-handles":
            return HttpResponse("handled below", status=502)
        return None


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    RAN.clear()
    PULLED.clear()
    yield
    assert gg.current_context() is None  # never leaks out of a request


@pytest.fixture
def up(upstream: MisbehavingUpstream, no_backoff: None) -> Iterator[MisbehavingUpstream]:
    """The real misbehaving upstream, configured as ``up`` in GATEWAY_GUARD."""
    with override_settings(GATEWAY_GUARD=gg_settings(upstream.url)):
        yield upstream


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(request id, status) of every gateway error the adapter logs.

    Recorded at the adapter's call, not from the log records: the core throttles its log
    lines per upstream and error type, which would make counts depend on test timing.
    """
    calls: list[tuple[str, int]] = []

    def record(ctx: gg.RequestContext, error: gg.UpstreamError, **kwargs: Any) -> None:
        calls.append((ctx.request_id, error.status))
        log_gateway_error(ctx, error, **kwargs)

    monkeypatch.setattr("gateway_guard.inbound._errors.log_gateway_error", record)
    return calls


Fetch = Callable[..., Any]


@pytest.fixture(params=["sync", "async"])
def fetch(request: pytest.FixtureRequest) -> Fetch:
    """GET (or ``method=``) a path through Django's sync or async test client.

    ``raise_request_exception=False``: the test clients re-raise whatever Django turned
    into a 500 by default; here, the response is what is under test.
    """
    if request.param == "sync":
        client = Client(raise_request_exception=False)

        def fetch_sync(url: str, method: str = "GET", **headers: str) -> Any:
            return client.generic(method, url, headers=headers)

        return fetch_sync
    aclient = AsyncClient(raise_request_exception=False)

    def fetch_async(url: str, method: str = "GET", **headers: str) -> Any:
        async def go() -> Any:
            return await aclient.generic(method, url, headers=headers)

        return asyncio.run(go())

    return fetch_async


def proxy_status(value: str) -> tuple[str, dict[str, Any]]:
    parsed: Any = http_sf.parse(value.encode("ascii"), tltype="list")
    [(item, params)] = parsed
    return str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}


def ids(messages: list[CheckMessage]) -> list[str | None]:
    return [m.id for m in messages]


# --- system checks --------------------------------------------------------------------------


def test_registered_checks_pass_on_a_valid_project() -> None:
    assert run_checks(tags=["gateway_guard"]) == []


def test_invalid_settings_give_one_e001_per_problem_naming_the_key_path() -> None:
    bad = gg_settings(
        upstreams={"payments": {"breaker": {"failure_rate": 1.5}}},
        shed={"max_concurrent": -1},
    )
    with override_settings(GATEWAY_GUARD=bad):
        messages = run_checks(tags=["gateway_guard"])
    assert ids(messages) == ["gateway_guard.E001", "gateway_guard.E001"]
    rate, shed = messages
    assert rate.msg == (
        "GATEWAY_GUARD: upstreams.payments.breaker.failure_rate: must be at most 1.0, got 1.5."
    )
    assert rate.hint == "See docs/settings.md#defaultsbreaker for what is allowed."
    assert shed.msg == "GATEWAY_GUARD: shed.max_concurrent: must be at least 0, got -1."
    assert shed.hint is not None and "docs/settings.md#shed" in shed.hint
    assert all(m.is_serious() for m in messages)


@pytest.mark.parametrize(
    ("settings_", "message", "anchor"),
    [
        (
            {"routes": [{"path": "/x", "retry": {"atempts": 1}}]},
            "routes.0.retry.atempts: unknown key; did you mean 'attempts'?",
            "#route-retry",
        ),
        ({"debug": "yes"}, "debug: must be true or false, got 'yes'.", "#top-level-keys"),
        (
            {"defaults": {"retry": {"attempts": 0}}},
            "defaults.retry.attempts: must be at least 1, got 0.",
            "#defaultsretry",
        ),
        ({"upstreams": {"up": {"base_url": "ftp://x"}}}, "upstreams.up.base_url", "#upstreamsname"),
    ],
)
def test_e001_messages_and_hints(settings_: dict[str, Any], message: str, anchor: str) -> None:
    with override_settings(GATEWAY_GUARD=settings_):
        [error] = check_settings()
    assert error.id == "gateway_guard.E001"
    assert error.msg.startswith("GATEWAY_GUARD: ")
    assert message in error.msg
    assert error.hint == f"See docs/settings.md{anchor} for what is allowed."


def test_settings_file_problems_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('service = "from-file"\n[upstreams.up]\nbase_url = "http://127.0.0.1:9"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text("[shed]\nmax_concurrent = -1\n")
    with override_settings(GATEWAY_GUARD=good):  # a Path works as well as a str
        assert check_settings() == []
        assert get_guard().settings.service == "from-file"
    with override_settings(GATEWAY_GUARD=str(bad)):
        [error] = check_settings()
    assert error.id == "gateway_guard.E001"
    assert (
        error.msg
        == f"GATEWAY_GUARD ({str(bad)!r}): shed.max_concurrent: must be at least 0, got -1."
    )
    missing = str(tmp_path / "missing.json")
    with override_settings(GATEWAY_GUARD=missing):
        [error] = check_settings()
    assert error.id == "gateway_guard.E001"
    assert "cannot be read" in error.msg and missing in error.msg


@pytest.mark.parametrize("value", [42, ["service", "shop"], b"gg.toml"])
def test_e002_when_the_setting_is_neither_a_mapping_nor_a_path(value: object) -> None:
    with override_settings(GATEWAY_GUARD=value):
        [error] = check_settings()
    assert error.id == "gateway_guard.E002"
    assert error.msg == (
        "GATEWAY_GUARD must be a mapping or the path of a .toml or .json file, "
        f"got {type(value).__name__}: {value!r}."
    )
    assert error.hint == "See docs/settings.md#where-settings-come-from."


def test_unset_setting_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "env.toml"
    file.write_text('service = "from-env"\n')
    monkeypatch.setenv("GATEWAY_GUARD_SETTINGS", str(file))
    with override_settings(GATEWAY_GUARD=None):
        assert check_settings() == []
        assert get_guard().settings.service == "from-env"
        monkeypatch.setenv("GATEWAY_GUARD__SHED__MAX_CONCURRENT", "many")
        with override_settings(GATEWAY_GUARD=None):
            [error] = check_settings()
    assert error.msg == (
        "GATEWAY_GUARD (from the environment, with GATEWAY_GUARD__* overrides): "
        "shed.max_concurrent: must be a whole number, got 'many'."
    )


def test_w001_when_the_middleware_is_not_installed() -> None:
    with override_settings(MIDDLEWARE=[SECURITY, INNER]):
        [warning] = check_middleware()
    assert warning.id == "gateway_guard.W001"
    assert "'gateway_guard.django.GatewayGuardMiddleware' is not in MIDDLEWARE" in warning.msg
    assert warning.hint is not None and "docs/django.md" in warning.hint
    assert not warning.is_serious()
    # Any path to the class (or a subclass) counts.
    with override_settings(MIDDLEWARE=["gateway_guard.django.middleware.GatewayGuardMiddleware"]):
        assert check_middleware() == []


def test_w002_when_django_middleware_that_belongs_below_comes_first() -> None:
    session = "django.contrib.sessions.middleware.SessionMiddleware"
    common = "django.middleware.common.CommonMiddleware"
    with override_settings(MIDDLEWARE=[SECURITY, session, common, MIDDLEWARE, INNER]):
        [warning] = check_middleware()
    assert warning.id == "gateway_guard.W002"
    assert f"comes after {session!r}, {common!r} in MIDDLEWARE" in warning.msg
    with override_settings(MIDDLEWARE=[SECURITY, MIDDLEWARE, session, common]):
        assert check_middleware() == []


@pytest.mark.parametrize(
    "wrong", ["gateway_guard.GatewayGuardMiddleware", "gateway_guard.GatewayGuardWSGI"]
)
def test_e004_when_middleware_lists_the_asgi_or_wsgi_wrapper(wrong: str) -> None:
    with override_settings(MIDDLEWARE=[SECURITY, wrong]):
        [error] = check_middleware()
    assert error.id == "gateway_guard.E004"
    assert error.msg.startswith(f"MIDDLEWARE lists {wrong!r}")
    assert error.hint == (
        "Use 'gateway_guard.django.GatewayGuardMiddleware' (see docs/django.md#quickstart)."
    )


def test_every_check_id_is_documented() -> None:
    source = Path(gg.__file__).parent / "django" / "checks.py"
    docs = Path(__file__).parent.parent / "docs" / "django.md"
    emitted = set(re.findall(r'id="(gateway_guard\.[EW]\d{3})"', source.read_text()))
    assert len(emitted) == 10
    documented = set(re.findall(r"`(gateway_guard\.[EW]\d{3})`", docs.read_text()))
    assert documented == emitted


def test_w003_when_debug_pages_would_reach_production() -> None:
    with override_settings(GATEWAY_GUARD=gg_settings(debug=True)):
        assert ids(check_settings()) == ["gateway_guard.W003"]
        with override_settings(DEBUG=True):
            assert check_settings() == []


def test_w004_when_the_brand_template_cannot_be_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    brand = {**BRAND, "template_dir": str(tmp_path)}  # a directory without error.html
    with override_settings(GATEWAY_GUARD=gg_settings(brand=brand)):
        [warning] = check_settings()
    assert warning.id == "gateway_guard.W004"
    assert "no error.html in" in warning.msg


def test_e003_for_invalid_view_policies() -> None:
    line = sys._getframe().f_lineno

    @gateway_policy(retry={"attempts": 0})
    def bad_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    @gateway_policy(depends_on=["nope"])
    async def dep_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    @gateway_policy(retries=2)
    def typo_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    messages = check_view_policies()
    assert ids(messages) == ["gateway_guard.E003"] * 3
    here = "tests/test_django.py"
    assert [m.msg for m in messages] == [
        f"@gateway_policy at {here}:{line + 2}: retry.attempts: must be at least 1, got 0.",
        f"@gateway_policy at {here}:{line + 6}: depends_on.0: unknown upstream 'nope' (up).",
        f"@gateway_policy at {here}:{line + 10}: retries: not allowed per view (allowed: "
        "connect_timeout, deadline, depends_on, raise_on_failure_status, read_timeout, retry).",
    ]
    assert messages[0].hint is not None and "#what-a-route-may-set" in messages[0].hint
    assert ids(run_checks(tags=["gateway_guard"])) == ["gateway_guard.E003"] * 3
    del bad_view, dep_view, typo_view, messages
    assert check_view_policies() == []  # policies of views that are gone are forgotten


@pytest.mark.implementation
def test_view_policies_of_the_urlconf_are_registered() -> None:
    views = {view for spec in registered_policies() for view in spec.views}
    assert {f"{__name__}.one_attempt", f"{__name__}.needs_up_async"} <= views


# --- get_guard and override_settings --------------------------------------------------------


def test_get_guard_is_built_once_and_rebuilt_when_the_setting_changes() -> None:
    first = get_guard()
    assert get_guard() is first
    first.breaker("up").force_open()
    with override_settings(GATEWAY_GUARD=gg_settings(service="other")):
        second = get_guard()
        assert second is not first and second.settings.service == "other"
        assert second.breaker("up").state is gg.BreakerState.CLOSED  # fresh breakers
    with override_settings(DEBUG=True):  # another setting: the same Guard
        third = get_guard()
        assert get_guard() is third
    assert third is not second and third.settings.service == "shop"
    assert third.breaker("up").state is gg.BreakerState.CLOSED


def test_invalid_settings_stop_the_middleware_at_load_time() -> None:
    with (
        override_settings(GATEWAY_GUARD={"shed": {"max_concurrent": -1}}),
        pytest.raises(gg.SettingsError, match=r"shed\.max_concurrent"),
    ):
        GatewayGuardMiddleware(lambda request: HttpResponse())


def test_middleware_is_sync_and_async_capable() -> None:
    async def async_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    assert GatewayGuardMiddleware.sync_capable and GatewayGuardMiddleware.async_capable
    assert iscoroutinefunction(GatewayGuardMiddleware(async_view))
    assert not iscoroutinefunction(GatewayGuardMiddleware(lambda request: HttpResponse()))


@pytest.mark.implementation
def test_async_client_drives_the_async_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = GatewayGuardMiddleware.__acall__

    async def spy(self: GatewayGuardMiddleware, request: HttpRequest) -> HttpResponseBase:
        calls.append(request.path)
        return await original(self, request)

    monkeypatch.setattr(GatewayGuardMiddleware, "__acall__", spy)
    response = asyncio.run(AsyncClient().get("/healthz"))
    assert response.status_code == 200 and calls == ["/healthz"]
    Client().get("/healthz")
    assert calls == ["/healthz"]


# --- request ids ----------------------------------------------------------------------------


def test_djangos_own_500_carries_the_request_id(fetch: Fetch) -> None:
    # Views' responses, 404s and error pages: test_adapter_contract.py. Django's own 500 too.
    response = fetch("/raise/value", **{"X-Request-ID": "trace-me"})
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "trace-me"
    generated = fetch("/raise/value")
    assert GENERATED_ID.fullmatch(generated.headers["X-Request-ID"])


def test_request_id_reaches_the_upstream(fetch: Fetch, up: MisbehavingUpstream) -> None:
    for url in ("/api/items", "/async/items"):
        response = fetch(url, **{"X-Request-ID": "r-42"})
        assert response.json()["upstream_saw"] == "r-42"


# --- gateway errors -------------------------------------------------------------------------


@pytest.mark.implementation
@pytest.mark.parametrize("prefix", ["/raise", "/araise"], ids=["sync-view", "async-view"])
def test_upstream_error_from_a_view_becomes_the_branded_page(
    fetch: Fetch, prefix: str, caplog: pytest.LogCaptureFixture, logged: list[tuple[str, int]]
) -> None:
    caplog.set_level(logging.INFO)
    html = fetch(f"{prefix}/timeout", Accept="text/html", **{"X-Request-ID": "rid-1"})
    assert html.status_code == 504
    assert proxy_status(html.headers["Proxy-Status"]) == (
        "shop",
        {"error": "connection_read_timeout"},
    )
    assert html.headers["Content-Type"] == "text/html; charset=utf-8"
    assert html.headers["Cache-Control"] == "no-store"
    assert html.headers["X-Request-ID"] == "rid-1"
    body = html.content.decode()
    assert body.startswith("<!doctype html>") and "Acme Shop" in body and "rid-1" in body
    assert int(html.headers["Content-Length"]) == len(html.content)

    api = fetch(f"{prefix}/circuit", Accept="application/json", **{"X-Request-ID": "rid-2"})
    assert api.status_code == 503
    assert proxy_status(api.headers["Proxy-Status"]) == (
        "shop",
        {"error": "destination_unavailable"},
    )
    assert api.headers["Retry-After"] == "7"
    assert api.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(api.content)
    assert (problem["status"], problem["retry_after"]) == (503, 7)
    assert problem["instance"] == "urn:request:rid-2"

    # Logged once each, by gateway_guard; Django does not add a "Gateway Timeout: ..." line.
    assert logged == [("rid-1", 504), ("rid-2", 503)]
    assert not [r for r in caplog.records if r.name == "django.request"]


def test_real_upstream_failure_through_a_view(fetch: Fetch, up: MisbehavingUpstream) -> None:
    up.set_mode("refuse")
    for url in ("/api/items", "/async/items"):
        response = fetch(url, Accept="application/json")
        assert response.status_code == 502
        assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "connection_refused"}


@pytest.mark.implementation
def test_other_exceptions_are_left_to_django(fetch: Fetch, logged: list[tuple[str, int]]) -> None:
    response = fetch("/raise/value")
    assert response.status_code == 500
    assert "Proxy-Status" not in response.headers
    assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])
    assert logged == []


def test_errors_the_app_handles_are_untouched(fetch: Fetch, up: MisbehavingUpstream) -> None:
    up.set_mode("refuse")
    response = fetch("/handled")
    assert (response.status_code, response.content) == (200, b"the app's own fallback")
    below = fetch("/mw-handles")  # a middleware below ours answered the view's error
    assert (below.status_code, below.content) == (502, b"handled below")
    assert "Proxy-Status" not in below.headers


@pytest.mark.implementation
def test_upstream_error_raised_by_a_middleware_below_is_branded(
    fetch: Fetch, logged: list[tuple[str, int]]
) -> None:
    response = fetch("/mw-fail", Accept="application/json", **{"X-Request-ID": "mw"})
    assert response.status_code == 504
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "connection_read_timeout"}
    assert json.loads(response.content)["instance"] == "urn:request:mw"
    assert logged == [("mw", 504)]


# --- shedding -------------------------------------------------------------------------------


def test_the_shedding_slot_is_released_after_an_exception(fetch: Fetch) -> None:
    # Shedding itself, exempt paths and slots after responses: test_adapter_contract.py.
    shed = {"max_concurrent": 1, "max_queue": 0}
    with override_settings(GATEWAY_GUARD=gg_settings(shed=shed)):
        assert fetch("/raise/value").status_code == 500
        assert fetch("/raise/value").status_code == 500  # not shed: the slot came back
        assert fetch("/whoami").status_code == 200


# --- @gateway_policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "policy"),
    [("/api/items", "/policy/one"), ("/async/items", "/policy/one-async")],
    ids=["sync-view", "async-view"],
)
def test_gateway_policy_limits_attempts(
    fetch: Fetch, up: MisbehavingUpstream, plain: str, policy: str
) -> None:
    up.set_mode("status", status=503)
    with override_settings(GATEWAY_GUARD=gg_settings(up.url, defaults={"retry": {"attempts": 3}})):
        before = up.stats().requests
        assert fetch(plain).status_code == 502
        assert up.stats().requests - before == 3
        before = up.stats().requests
        response = fetch(policy, Accept="application/json")
        assert up.stats().requests - before == 1
    assert response.status_code == 502
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"received-status": 503}


@pytest.mark.parametrize(
    ("url", "view"),
    [("/policy/needs-up", "needs_up"), ("/policy/needs-up-async", "needs_up_async")],
    ids=["sync-view", "async-view"],
)
def test_gateway_policy_depends_on(
    fetch: Fetch, up: MisbehavingUpstream, url: str, view: str
) -> None:
    assert fetch(url).content == b"ran"
    assert RAN[view] == 1
    get_guard().breaker("up").force_open()
    response = fetch(url, Accept="application/json")
    assert response.status_code == 503
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "destination_unavailable"}
    assert RAN[view] == 1  # not run
    get_guard().breaker("up").reset()
    assert fetch(url).content == b"ran"


def spec_of(view: str) -> PolicySpec:
    [spec] = [s for s in registered_policies() if view in s.views]
    return spec


@pytest.mark.implementation
def test_gateway_policy_is_compiled_once_per_guard() -> None:
    name = f"{__name__}.one_attempt"
    spec = spec_of(name)
    guard = get_guard()
    route = spec.route(guard, name)
    assert spec.route(guard, name) is route
    assert route.name == name and route.calls["up"].retry.attempts == 1
    with override_settings(GATEWAY_GUARD=gg_settings(defaults={"deadline": 9.0})):
        rebuilt = spec.route(get_guard(), name)
    assert rebuilt is not route and rebuilt.calls["up"].deadline == 9.0


@pytest.mark.implementation
def test_gateway_policy_on_a_class_based_view(up: MisbehavingUpstream) -> None:
    # method_decorator decorates again on every call: the policy must still be compiled
    # once, not once per request.
    up.set_mode("status", status=503)
    name = f"{__name__}.CartView.get"
    with override_settings(GATEWAY_GUARD=gg_settings(up.url, defaults={"retry": {"attempts": 3}})):
        client = Client()
        assert client.get("/policy/cbv").status_code == 502
        assert up.stats().requests == 1
        route = spec_of(name).route(get_guard(), name)
        assert client.get("/policy/cbv").status_code == 502
        assert up.stats().requests == 2
        assert spec_of(name).route(get_guard(), name) is route


def test_gateway_policy_outside_a_request_just_runs_the_view() -> None:
    get_guard().breaker("up").force_open()
    request = RequestFactory().get("/policy/needs-up")
    assert needs_up(request).content == b"ran"
    assert asyncio.run(needs_up_async(request)).content == b"ran"


# --- end to end: Django's WSGI handler on cheroot, its ASGI handler on uvicorn --------------


def _with_lifespan(app: Any) -> Any:
    """Django's ASGI handler refuses lifespan scopes; uvicorn here insists on lifespan."""

    async def wrapper(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapper


SERVED: dict[str, str] = {}  # base URL -> "wsgi" | "asgi"


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The project served for real. The handlers read the settings live, per request."""
    if request.param == "wsgi":
        from django.core.wsgi import get_wsgi_application

        serving = serve_wsgi(get_wsgi_application())
    else:
        from django.core.asgi import get_asgi_application

        serving = serve_asgi(_with_lifespan(get_asgi_application()))
    with serving as url:
        SERVED[url] = request.param
        yield url


def http_get(url: str, method: str = "GET", **headers: str) -> httpx.Response:
    return httpx.request(method, url, headers=headers, timeout=WAIT)


ACCEPTS = {"html": "text/html", "json": "application/json"}

# mode options, status, Proxy-Status parameters, Retry-After
FAILURES: dict[str, tuple[dict[str, Any], int, dict[str, Any], str | None]] = {
    "refuse": ({"mode": "refuse"}, 502, {"error": "connection_refused"}, None),
    "hang": ({"mode": "hang"}, 504, {"error": "connection_read_timeout"}, None),
    "reset": ({"mode": "reset"}, 502, {"error": "connection_terminated"}, None),
    "garbage": ({"mode": "garbage"}, 502, {"error": "http_protocol_error"}, None),
    "truncated": ({"mode": "truncated"}, 502, {"error": "http_response_incomplete"}, None),
    "status-503": (
        {"mode": "status", "status": 503, "retry_after": "2"},
        502,
        {"received-status": 503},
        "2",
    ),
}


def assert_gateway_error(
    response: httpx.Response,
    kind: str,
    rid: str,
    status: int,
    params: dict[str, Any],
    retry_after: str | None,
) -> None:
    assert response.status_code == status, response.text[:300]
    assert proxy_status(response.headers["proxy-status"]) == ("shop", params)
    assert response.headers.get("retry-after") == retry_after
    assert response.headers["x-request-id"] == rid
    assert response.headers["cache-control"] == "no-store"
    assert int(response.headers["content-length"]) == len(response.content)
    if kind == "html":
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.text.startswith("<!doctype html>")
        assert "Acme Shop" in response.text and f"<code>{rid}</code>" in response.text
        assert "127.0.0.1" not in response.text  # never the upstream's address
    else:
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == status and problem["instance"] == f"urn:request:{rid}"
        if retry_after is not None:
            assert problem["retry_after"] == int(retry_after)


@pytest.mark.e2e
@pytest.mark.parametrize("view", ["/api/items", "/async/items"], ids=["sync-view", "async-view"])
@pytest.mark.parametrize(
    ("mode", "status", "params", "retry_after"), FAILURES.values(), ids=FAILURES.keys()
)
def test_e2e_upstream_failures(
    server: str,
    up: MisbehavingUpstream,
    view: str,
    mode: dict[str, Any],
    status: int,
    params: dict[str, Any],
    retry_after: str | None,
) -> None:
    up.set_mode(**mode)
    with ThreadPoolExecutor(len(ACCEPTS)) as pool:
        futures = {
            kind: pool.submit(
                http_get, server + view, accept=accept, **{"x-request-id": f"e2e-{kind}"}
            )
            for kind, accept in ACCEPTS.items()
        }
        responses = {kind: future.result(timeout=WAIT) for kind, future in futures.items()}
    for kind, response in responses.items():
        assert_gateway_error(response, kind, f"e2e-{kind}", status, params, retry_after)
    up.set_mode("ok")
    healthy = http_get(server + view, **{"x-request-id": "healthy"})
    assert healthy.status_code == 200 and healthy.json()["upstream_saw"] == "healthy"


@pytest.mark.e2e
@pytest.mark.parametrize("view", ["/api/items", "/async/items"], ids=["sync-view", "async-view"])
def test_e2e_breaker_opens_answers_fast_and_recovers(
    server: str, up: MisbehavingUpstream, view: str
) -> None:
    open_seconds = 0.5
    breaker = {"window_size": 2, "min_calls": 2, "open_seconds": open_seconds}
    with override_settings(GATEWAY_GUARD=gg_settings(up.url, defaults={"breaker": breaker})):
        up.set_mode("status", status=500)
        for _ in range(2):
            assert http_get(server + view).status_code == 502
        assert get_guard().breaker("up").state is gg.BreakerState.OPEN

        up.set_mode("ok")  # healthy again, but the breaker does not know yet
        up.reset_stats()
        for kind, accept in ACCEPTS.items():
            started = time.monotonic()
            response = http_get(server + view, accept=accept, **{"x-request-id": f"open-{kind}"})
            assert time.monotonic() - started < 1.0
            assert_gateway_error(
                response, kind, f"open-{kind}", 503, {"error": "destination_unavailable"}, "1"
            )
        assert up.stats().requests == 0  # answered without touching the upstream

        deadline = time.monotonic() + WAIT
        while (response := http_get(server + view)).status_code != 200:
            assert time.monotonic() < deadline, "the breaker never let a probe through"
            time.sleep(0.05)
        assert up.stats().requests == 1
        assert get_guard().breaker("up").state is not gg.BreakerState.OPEN


@pytest.mark.e2e
def test_e2e_head_404_healthz_and_streams(server: str, up: MisbehavingUpstream) -> None:
    up.set_mode("refuse")
    get = http_get(server + "/api/items", accept="text/html", **{"x-request-id": "h"})
    head = http_get(server + "/api/items", "HEAD", accept="text/html", **{"x-request-id": "h"})
    assert (get.status_code, head.status_code) == (502, 502)
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["x-request-id"] == "h"

    missing = http_get(server + "/nowhere", **{"x-request-id": "nf"})
    assert (missing.status_code, missing.headers["x-request-id"]) == (404, "nf")
    health = http_get(server + "/healthz")
    assert health.status_code == 200 and GENERATED_ID.fullmatch(health.headers["x-request-id"])

    # Each handler gets the kind of iterator it streams without buffering.
    url = server + ("/astream" if SERVED[server] == "asgi" else "/stream")
    with httpx.stream("GET", url, timeout=WAIT) as response:
        assert response.headers["x-request-id"]
        assert b"".join(response.iter_bytes()) == b"chunk 0\nchunk 1\nchunk 2\n"


# --- the example project, as a user runs it --------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_app" / "app.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.e2e
def test_example_project_runs(upstream: MisbehavingUpstream, tmp_path: Path) -> None:
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "PYTHONWARNINGS": "error"}
    check = subprocess.run(
        [sys.executable, str(EXAMPLE), "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "no issues" in check.stdout

    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "runserver", f"127.0.0.1:{port}", "--noreload"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(base + "/healthz", timeout=WAIT)
                break
            except httpx.TransportError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert health.json() == {"status": "ok"} and health.headers["x-request-id"]
        assert "Acme Demo Shop" in httpx.get(base + "/", timeout=WAIT).text
        assert len(httpx.get(base + "/api/items", timeout=WAIT).json()["items"]) == 3

        upstream.set_mode("refuse")
        down = httpx.get(base + "/api/items", headers={"accept": "application/json"}, timeout=WAIT)
        assert down.status_code in (502, 503)  # refused, or the breaker opened on the retries
        assert down.headers["content-type"] == "application/problem+json"
        assert proxy_status(down.headers["proxy-status"])[0] == "demo-shop"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
