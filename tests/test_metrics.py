"""Prometheus metrics (gateway_guard.metrics): what the hooks record, and every way to
serve them. Metrics live in prometheus_client's default registry, shared by the whole
process, so each test uses upstream and route names of its own."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.test import RequestFactory
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

import gateway_guard as gg
import gateway_guard.django
import gateway_guard.metrics as gm
import test_django  # noqa: F401 - configures Django once per process
from gateway_guard.retry import testing

_names = itertools.count()


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    with testing():
        yield


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def samples(
    text: str | bytes | None = None,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by (name, sorted labels)."""
    if text is None:
        text = gm.exposition()[0]
    if isinstance(text, bytes):
        text = text.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metered(name: str, upstream: dict[str, Any] | None = None, **settings: Any) -> gg.Guard:
    return gg.Guard(
        {
            "metrics": {"enabled": True},
            "upstreams": {name: {"base_url": "http://up.test", **(upstream or {})}},
            **settings,
        }
    )


def scripted(*statuses: int) -> httpx.MockTransport:
    answers = list(statuses)
    return httpx.MockTransport(lambda request: httpx.Response(answers.pop(0)))


def test_import_gateway_guard_imports_no_prometheus_client() -> None:
    code = "import sys, gateway_guard; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_calls_attempts_retries_and_durations() -> None:
    up = unique("calls")
    guard = metered(up)
    with guard.client(up, transport=scripted(503, 200, 503, 503, 503)) as client:
        assert client.get("/a").status_code == 200
        with pytest.raises(gg.UpstreamStatusError):
            client.get("/b")
    s = samples()
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="success") == 1
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="failure") == 1
    assert value(s, "gateway_guard_upstream_attempts_total", upstream=up) == 5
    assert value(s, "gateway_guard_upstream_retries_total", upstream=up) == 3
    assert (
        value(s, "gateway_guard_upstream_failures_total", upstream=up, proxy_error="", status="503")
        == 1
    )
    assert (
        value(
            s, "gateway_guard_upstream_call_duration_seconds_count", upstream=up, outcome="success"
        )
        == 1
    )
    assert value(s, "gateway_guard_bulkhead_in_flight", upstream=up) == 0
    assert value(s, "gateway_guard_bulkhead_limit", upstream=up) == 100
    assert value(s, "gateway_guard_retry_budget_remaining", upstream=up) > 0


def test_transport_errors_by_proxy_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    up = unique("refused")
    guard = metered(up, upstream={"retry": {"attempts": 1}})
    with (
        guard.client(up, transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(gg.UpstreamConnectError) as info,
    ):
        client.get("/")
    s = samples()
    labels = {"upstream": up, "proxy_error": info.value.proxy_error or "", "status": ""}
    assert value(s, "gateway_guard_upstream_failures_total", **labels) == 1


def test_breaker_state_transitions_and_rejections() -> None:
    up = unique("breaker")
    guard = metered(
        up, upstream={"breaker": {"min_calls": 2, "window_size": 2}, "retry": {"attempts": 1}}
    )
    s = samples()
    assert value(s, "gateway_guard_breaker_state", upstream=up, state="closed") == 1
    with guard.client(up, transport=scripted(500, 500)) as client:
        for _ in range(2):
            with pytest.raises(gg.UpstreamStatusError):
                client.get("/")
        with pytest.raises(gg.CircuitOpenError):
            client.get("/")
    s = samples()
    for state in ("closed", "open", "half_open", "forced_open", "disabled"):
        expected = 1.0 if state == "open" else 0.0
        assert value(s, "gateway_guard_breaker_state", upstream=up, state=state) == expected
    transition = {"upstream": up, "from_state": "closed", "to_state": "open"}
    assert (
        value(s, "gateway_guard_breaker_transitions_total", **transition, reason="failure_rate")
        == 1
    )
    assert value(s, "gateway_guard_upstream_calls_total", upstream=up, outcome="rejected") == 1
    assert (
        value(s, "gateway_guard_upstream_rejections_total", upstream=up, reason="breaker_open") == 1
    )


def test_inbound_in_flight_shed_and_gateway_errors() -> None:
    up, route = unique("inbound"), unique("/inbound")
    guard = metered(
        up,
        routes=[{"path": route, "shed": {"max_concurrent": 1, "max_queue": 0}}],
    )
    inside: list[dict[Any, float]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == route and not inside:
            inside.append(samples())
            # A second request while this one holds the route's only slot: shed.
            transport = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as nested:
                assert (await nested.get(route)).status_code == 503
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = gg.GatewayGuardMiddleware(app, guard=guard)

    async def main() -> None:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get(route)).status_code == 200

    asyncio.run(main())
    assert value(inside[0], "gateway_guard_inbound_in_flight", route=route) == 1
    s = samples()
    assert value(s, "gateway_guard_inbound_in_flight", route=route) == 0
    assert value(s, "gateway_guard_inbound_shed_total", route=route, reason="capacity") == 1
    labels = {"route": route, "status": "503", "proxy_error": "connection_limit_reached"}
    assert value(s, "gateway_guard_gateway_errors_total", **labels) == 1


# --- serving them -------------------------------------------------------------------------------


def served_guard() -> tuple[gg.Guard, str]:
    up = unique("served")
    guard = gg.Guard({"metrics": {"path": "/metrics"}, "upstreams": {up: {}}})
    return guard, up


def test_the_asgi_middleware_serves_the_path() -> None:
    guard, up = served_guard()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app never sees /metrics")

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=gg.GatewayGuardMiddleware(app, guard=guard))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get("/metrics"), await client.post("/metrics")]

    get, post = asyncio.run(main())
    assert get.status_code == 200 and get.headers["content-type"].startswith("text/plain")
    assert value(samples(get.text), "gateway_guard_breaker_state", upstream=up, state="closed") == 1
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")


def test_the_wsgi_middleware_serves_the_path() -> None:
    guard, up = served_guard()

    def app(environ: Any, start_response: Any) -> list[bytes]:
        raise AssertionError("the app never sees /metrics")

    transport = httpx.WSGITransport(app=gg.GatewayGuardWSGI(app, guard=guard))
    with httpx.Client(transport=transport, base_url="http://t") as client:
        response = client.get("/metrics")
        head = client.head("/metrics")
    assert response.status_code == 200
    assert (
        value(samples(response.text), "gateway_guard_breaker_state", upstream=up, state="closed")
        == 1
    )
    assert head.status_code == 200 and head.content == b""


def test_the_django_middleware_and_view_serve_them() -> None:
    from django.test import override_settings

    from gateway_guard.django.conf import get_guard  # noqa: F401 - the process's Guard

    up = unique("django")
    settings = {"metrics": {"path": "/metrics"}, "upstreams": {up: {}}}
    with override_settings(GATEWAY_GUARD=settings):
        middleware = gateway_guard.django.GatewayGuardMiddleware(
            lambda request: pytest.fail("the view never sees /metrics")
        )
        response = middleware(RequestFactory().get("/metrics"))
        assert response.status_code == 200  # type: ignore[union-attr]
        text = response.content.decode()  # type: ignore[union-attr]
        assert value(samples(text), "gateway_guard_breaker_state", upstream=up, state="closed") == 1
    view = gateway_guard.django.metrics_view(RequestFactory().get("/anywhere"))
    assert view.status_code == 200 and b"gateway_guard_breaker_state" in view.content


def test_the_mounts() -> None:
    guard, up = served_guard()
    flask_app = Flask(__name__)
    flask_app.add_url_rule("/m", view_func=gm.flask_view)
    response = flask_app.test_client().get("/m")
    assert response.status_code == 200 and b"gateway_guard_breaker_state" in response.data

    transport = httpx.WSGITransport(app=gm.make_wsgi_app())
    with httpx.Client(transport=transport, base_url="http://t") as client:
        assert b"gateway_guard_breaker_state" in client.get("/").content

    async def main() -> bytes:
        asgi = httpx.ASGITransport(app=gm.make_asgi_app())
        async with httpx.AsyncClient(transport=asgi, base_url="http://t") as client:
            return (await client.get("/")).content

    assert b"gateway_guard_breaker_state" in asyncio.run(main())
    assert guard.upstreams == (up,)


def test_attach_is_idempotent() -> None:
    up = unique("twice")
    guard = metered(up)
    gm.attach(guard)  # already attached by the settings: nothing more
    with guard.client(up, transport=scripted(200)) as client:
        client.get("/")
    assert value(samples(), "gateway_guard_upstream_attempts_total", upstream=up) == 1


def test_the_flask_extension_serves_the_path() -> None:
    from gateway_guard.flask import GatewayGuard

    up = unique("flask")
    app = Flask(__name__)
    app.config["GATEWAY_GUARD"] = {"metrics": {"path": "/metrics"}, "upstreams": {up: {}}}
    GatewayGuard(app)

    @app.get("/metrics")
    def shadowed() -> str:
        raise AssertionError("the middleware answers first")

    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert value(samples(text), "gateway_guard_breaker_state", upstream=up, state="closed") == 1
