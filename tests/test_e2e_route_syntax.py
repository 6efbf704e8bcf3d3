"""Routes written in Flask's and Django's own syntax shed with ``depends_on``, for real.

A Flask app under cheroot with ``[[routes]] path = "/checkout/<path:rest>"`` and a Django
project (Django's WSGIHandler under cheroot) with ``path = "orders/<int:id>/"``: once the
``payments`` breaker opens, those routes answer 503 ``destination_unavailable`` without
running the view, while other paths still run theirs. Plus the startup warnings for a
route that matches none of the app's URL patterns (Flask's log line, Django's W011/W012).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import flask
import httpx
import pytest
from django.core.checks import run_checks
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import include, path

import django_setup  # noqa: F401 - configures Django once for the process
import gateway_guard as gg
from gateway_guard.django import get_guard
from gateway_guard.flask import GatewayGuard
from gateway_guard.testing import MisbehavingUpstream
from servers import serve_wsgi

WAIT = 10.0


def settings_for(up: MisbehavingUpstream, route: str) -> dict[str, Any]:
    return {
        "service": "shop",
        "defaults": {"retry": {"attempts": 1}},
        "upstreams": {
            "payments": {
                "base_url": up.url,
                "breaker": {"window_size": 2, "min_calls": 2, "failure_rate": 0.5},
            }
        },
        "routes": [{"path": route, "depends_on": ["payments"]}],
    }


def open_the_breaker(base: str, up: MisbehavingUpstream, guard: gg.Guard) -> None:
    up.set_mode("status", status=500)
    for _ in range(2):
        assert httpx.get(base + "/pay", timeout=WAIT).status_code == 502
    assert guard.breaker("payments").state is gg.BreakerState.OPEN
    up.set_mode("ok")
    up.reset_stats()


def assert_shed(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert "destination_unavailable" in response.headers["proxy-status"]
    assert response.headers["x-request-id"]
    assert "view ran" not in response.text


# --- Flask --------------------------------------------------------------------------------


def flask_app(up: MisbehavingUpstream, route: str) -> tuple[Any, GatewayGuard]:
    app = flask.Flask("shop")
    app.config["GATEWAY_GUARD"] = settings_for(up, route)
    ext = GatewayGuard(app)

    @app.get("/pay")
    def pay() -> str:
        with ext.guard.client("payments") as client:
            client.get("/charge")
        return "paid"

    @app.route("/checkout/<path:rest>", methods=["GET", "POST"])
    def checkout(rest: str) -> str:
        return f"view ran: {rest}"

    @app.get("/catalog/<int:id>")
    def catalog(id: int) -> str:
        return "view ran"

    return app, ext


def test_flask_route_in_werkzeug_syntax_sheds_while_the_breaker_is_open(
    upstream: MisbehavingUpstream, no_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    app, ext = flask_app(upstream, "/checkout/<path:rest>")
    with serve_wsgi(app) as base, caplog.at_level(logging.WARNING, "gateway_guard"):
        assert httpx.get(base + "/checkout/cart/7", timeout=WAIT).text == "view ran: cart/7"
        with app.app_context():
            open_the_breaker(base, upstream, ext.guard)
        assert_shed(httpx.get(base + "/checkout/cart/7", timeout=WAIT))
        assert_shed(httpx.post(base + "/checkout/x", timeout=WAIT))
        # Werkzeug's <path:rest> needs a segment: /checkout/ is not the route, nor shed.
        assert httpx.get(base + "/checkout/", timeout=WAIT).status_code == 404
        assert httpx.get(base + "/catalog/3", timeout=WAIT).text == "view ran"
        assert upstream.stats().requests == 0
    assert not [r for r in caplog.records if "matches none" in r.getMessage()]


def test_flask_warns_once_about_a_route_that_matches_no_rule(
    upstream: MisbehavingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = flask_app(upstream, "/checkout")  # a typo: no rule matches
    client = app.test_client()
    with caplog.at_level(logging.WARNING, "gateway_guard"):
        for _ in range(2):
            # Closed, so the middleware resets its request context in this thread.
            client.get("/catalog/3").close()
    [warning] = [r.getMessage() for r in caplog.records if "matches none" in r.getMessage()]
    assert "routes.0.path: '/checkout' matches none of Flask app 'shop'" in warning
    # The one-shot hook took itself out.
    assert app.before_request_funcs.get(None, []) == []


# --- Django -------------------------------------------------------------------------------


def order(request: HttpRequest, id: int) -> HttpResponse:
    return HttpResponse("view ran")


def pay(request: HttpRequest) -> HttpResponse:
    with get_guard().client("payments") as client:
        client.get("/charge")
    return HttpResponse("paid")


class URLConf:
    urlpatterns = [
        path("pay", pay),
        path("shop/", include([path("orders/<int:id>/", order)])),
        path("orders/<int:id>/", order),
    ]


def django_settings(up: MisbehavingUpstream, *routes: str) -> Any:
    gg_settings = settings_for(up, routes[0])
    gg_settings["routes"] = [{"path": r, "depends_on": ["payments"]} for r in routes]
    return override_settings(
        ROOT_URLCONF=URLConf,
        MIDDLEWARE=["gateway_guard.django.GatewayGuardMiddleware"],
        GATEWAY_GUARD=gg_settings,
    )


@pytest.fixture
def django_server(upstream: MisbehavingUpstream) -> Iterator[str]:
    from django.core.wsgi import get_wsgi_application

    with django_settings(upstream, "orders/<int:id>/"), serve_wsgi(get_wsgi_application()) as url:
        yield url


def test_django_route_in_django_syntax_sheds_while_the_breaker_is_open(
    django_server: str, upstream: MisbehavingUpstream, no_backoff: None
) -> None:
    base = django_server
    assert httpx.get(base + "/orders/7/", timeout=WAIT).text == "view ran"
    open_the_breaker(base, upstream, get_guard())
    assert_shed(httpx.get(base + "/orders/7/", timeout=WAIT))
    # Django's <int:id> is ASCII digits: this path is not the route (the URLconf 404s it).
    assert httpx.get(base + "/orders/x/", timeout=WAIT).status_code == 404
    assert httpx.get(base + "/shop/orders/7/", timeout=WAIT).text == "view ran"
    assert upstream.stats().requests == 0


def test_django_checks_warn_about_routes_matching_no_url_pattern(
    upstream: MisbehavingUpstream,
) -> None:
    routes = (
        "orders/<int:id>/",  # matches
        "shop/orders/<slug:id>/",  # matches through include()
        "/{rest:path}",  # matches everything
        "orders/<int:id>",  # no trailing slash: matches nothing
        "/orders/<int:id>/",  # matches, but read as Werkzeug's
    )
    with django_settings(upstream, *routes):
        messages = [
            m
            for m in run_checks(tags=["gateway_guard"])
            if m.id in ("gateway_guard.W011", "gateway_guard.W012")
        ]
    got = [(m.id, m.msg.split(":")[1].strip()) for m in messages]
    assert got == [
        ("gateway_guard.W012", "routes.4.path"),
        ("gateway_guard.W011", "routes.3.path"),
    ]
    w011 = next(m for m in messages if m.id == "gateway_guard.W011")
    assert "'orders/<int:id>' matches none of the URL patterns" in w011.msg
    w012 = next(m for m in messages if m.id == "gateway_guard.W012")
    assert "'orders/<int:id>/'" in w012.hint
