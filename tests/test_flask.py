"""The Flask extension: setup, settings, per-view policies, error handler precedence, e2e.

Request ids, error pages, shedding, re-branding and streaming, which every adapter does
alike, are asserted in test_adapter_contract.py (Flask included).

Unit tests drive the app through Flask's test client (the whole WSGI stack, wrapper
included) with upstreams scripted by ``httpx.MockTransport``. The end-to-end tests serve
the app with cheroot and call the real misbehaving upstream, all on 127.0.0.1. Every wait
for another thread is bounded by ``WAIT``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import re
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import http_sf
import httpx
import pytest
from flask import Blueprint, Flask, current_app, stream_with_context
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue
from flask.views import MethodView
from werkzeug.exceptions import HTTPException
from werkzeug.test import TestResponse

import gateway_guard as gg
from gateway_guard.flask import (
    EXTENSION_KEY,
    GatewayGuard,
    GatewayGuardState,
    UpstreamBadGateway,
    UpstreamHTTPError,
    UpstreamServiceUnavailable,
    get_guard,
)
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_wsgi

WAIT = 10.0
UPSTREAM_URL = "http://up.test"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
HTML = "text/html"
JSON = "application/json"
ROOT = Path(__file__).parent.parent


def settings(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"service": "shop", "upstreams": {"up": {"base_url": UPSTREAM_URL}}}
    base.update(extra)
    return base


def proxy_status(value: str) -> tuple[str, dict[str, Any]]:
    """One Proxy-Status member parsed as RFC 8941 says: (member, params); tokens as str."""
    [(item, params)] = http_sf.parse(value.encode("ascii"), tltype="list")
    return str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}


class BufferedClient(FlaskClient):
    """A test client that reads the whole response and closes the app's iterable at once.

    As a WSGI server does: the wrapper releases the shedding slot and resets the request
    context in ``close()``, which Flask's default (streamed) test responses call only when
    the test closes them.
    """

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def new_app(name: str = "shop", source: Any = None) -> Flask:
    app = Flask(name)
    app.test_client_class = BufferedClient
    if source is not None:
        app.config["GATEWAY_GUARD"] = source
    return app


def make_app(**extra: Any) -> tuple[Flask, GatewayGuard]:
    app = new_app()
    app.config["GATEWAY_GUARD"] = settings(**extra)
    return app, GatewayGuard(app)


def add_raising_view(app: Flask | Blueprint, path: str, error: Exception) -> None:
    def view() -> ResponseReturnValue:
        raise error

    app.add_url_rule(path, endpoint=path.strip("/").replace("/", "_") or "root", view_func=view)


def open_breaker() -> gg.CircuitOpenError:
    return gg.CircuitOpenError("open", upstream="up", retry_after=12.2)


def refused() -> gg.UpstreamConnectError:
    return gg.UpstreamConnectError(
        "connect to http://10.1.2.3:8080 failed", upstream="up", attempts=3
    )


def counting(status: int = 200) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json={"ok": status < 400})

    return httpx.MockTransport(handler), seen


# --- setup: init_app, factories, several apps -----------------------------------------------


def test_constructor_sets_up_the_app() -> None:
    app, ext = make_app()
    state = app.extensions[EXTENSION_KEY]
    assert isinstance(state, GatewayGuardState)
    assert isinstance(state.guard, gg.Guard)
    assert isinstance(app.wsgi_app, gg.GatewayGuardWSGI)
    assert app.wsgi_app.guard is state.guard
    assert ext.guard is state.guard
    assert get_guard(app) is state.guard


def test_the_extension_never_holds_the_app() -> None:
    app, ext = make_app()
    seen: set[int] = set()
    todo: list[Any] = [ext]
    while todo:  # everything reachable from the extension, minus modules and classes
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | ModuleType):
            continue
        seen.add(id(obj))
        assert obj is not app, "the extension keeps a reference to the app"
        todo.extend(gc.get_referents(obj))


def test_app_factory_with_two_apps_and_different_settings() -> None:
    ext = GatewayGuard()

    def create_app(service: str) -> Flask:
        app = new_app(service)
        app.config["GATEWAY_GUARD"] = settings(service=service)
        ext.init_app(app)
        add_raising_view(app, "/boom", refused())

        @app.get("/who")
        def who() -> dict[str, str]:
            return {
                "ext": ext.guard.settings.service,
                "current": gg.current_guard().settings.service,
            }

        return app

    shop, admin = create_app("shop"), create_app("admin")
    shop_guard, admin_guard = get_guard(shop), get_guard(admin)
    assert shop_guard is not admin_guard
    for app, name in ((shop, "shop"), (admin, "admin")):
        client = app.test_client()
        assert client.get("/who").get_json() == {"ext": name, "current": name}
        response = client.get("/boom")
        assert response.status_code == 502
        assert proxy_status(response.headers["Proxy-Status"])[0] == name
        with app.app_context():
            assert ext.guard is get_guard(app)
    with pytest.raises(RuntimeError, match="serves 2 Flask apps"):
        _ = ext.guard


def test_ext_guard_outside_an_app_context() -> None:
    ext = GatewayGuard()
    with pytest.raises(RuntimeError, match="not set up on any Flask app"):
        _ = ext.guard
    app = new_app("one")
    app.config["GATEWAY_GUARD"] = settings()
    ext.init_app(app)
    assert ext.guard is get_guard(app)  # exactly one app: no ambiguity
    other = new_app("other")
    with other.app_context(), pytest.raises(RuntimeError, match="not set up on Flask app"):
        _ = ext.guard
    with pytest.raises(RuntimeError, match="app context"):
        get_guard()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_as_a_settings_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"gg{suffix}"
    if suffix == ".toml":
        path.write_text('service = "from-file"\n[upstreams.up]\nbase_url = "http://up.test"\n')
    else:
        path.write_text(json.dumps(settings(service="from-file")))
    app = new_app("files")
    app.config["GATEWAY_GUARD"] = str(path)
    GatewayGuard(app)
    assert get_guard(app).settings.service == "from-file"
    assert get_guard(app).policy("up").base_url == UPSTREAM_URL


def test_arguments_beat_config() -> None:
    def app_with_config() -> Flask:
        app = new_app("args")
        app.config["GATEWAY_GUARD"] = settings(service="config")
        return app

    assert get_guard(_init(GatewayGuard(settings=settings(service="ctor")))).settings.service == (
        "ctor"
    )
    guard = gg.Guard(settings(service="shared"))
    ext = GatewayGuard(guard=guard)
    first, second = app_with_config(), app_with_config()
    ext.init_app(first)
    ext.init_app(second)
    assert get_guard(first) is get_guard(second) is guard  # guard= is shared on purpose
    # init_app's arguments beat the constructor's, which beat the config.
    ext = GatewayGuard(settings=settings(service="ctor"))
    app = app_with_config()
    ext.init_app(app, settings=settings(service="init"))
    assert get_guard(app).settings.service == "init"
    app = app_with_config()
    GatewayGuard().init_app(app)
    assert get_guard(app).settings.service == "config"


def _init(ext: GatewayGuard) -> Flask:
    app = new_app("x")
    app.config["GATEWAY_GUARD"] = settings(service="config")
    ext.init_app(app)
    return app


def test_guard_and_settings_together_are_a_type_error() -> None:
    guard = gg.Guard(settings())
    with pytest.raises(TypeError, match="either guard= or settings="):
        GatewayGuard(settings=settings(), guard=guard)
    with pytest.raises(TypeError, match="either guard= or settings="):
        GatewayGuard().init_app(new_app("x"), settings=settings(), guard=guard)


def test_bad_settings_fail_in_init_app() -> None:
    app = new_app("bad")
    app.config["GATEWAY_GUARD"] = {"upstreams": {"up": {"breaker": {"failure_rate": 1.5}}}}
    with pytest.raises(gg.SettingsError, match=r"upstreams\.up\.breaker\.failure_rate"):
        GatewayGuard(app)
    assert EXTENSION_KEY not in app.extensions
    app.config["GATEWAY_GUARD"] = 42
    with pytest.raises(gg.SettingsError, match=r'app.config\["GATEWAY_GUARD"\].*got int'):
        GatewayGuard(app)


def test_init_app_twice_on_one_app_raises() -> None:
    app, ext = make_app()
    with pytest.raises(RuntimeError, match="already set up"):
        ext.init_app(app)


# --- request ids ---------------------------------------------------------------------------------


def test_flasks_own_responses_carry_one_request_id() -> None:
    # Views' responses, 404s and error pages: test_adapter_contract.py. Flask's own 405 too.
    app, _ = make_app()

    @app.get("/ok")
    def ok() -> str:
        return "ok"

    response = app.test_client().post("/ok", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 405
    assert response.headers.getlist("X-Request-ID") == ["req-42"]
    [rid] = app.test_client().post("/ok").headers.getlist("X-Request-ID")
    assert GENERATED_ID.fullmatch(rid)


# --- gateway errors in views: logged once --------------------------------------------------------


@pytest.mark.parametrize("with_handler", [False, True])
def test_gateway_error_is_logged_once(caplog: pytest.LogCaptureFixture, with_handler: bool) -> None:
    app, _ = make_app()
    # Log lines are throttled per (upstream, error type) and second, process-wide: an
    # upstream name of its own keeps other tests' lines from holding this one back.
    upstream = f"logged-{uuid.uuid4().hex}"
    add_raising_view(app, "/boom", gg.UpstreamConnectError("refused", upstream=upstream))
    if with_handler:
        app.register_error_handler(502, lambda e: ("mine", 502))
    with caplog.at_level(logging.WARNING, logger="gateway_guard"):
        app.test_client().get("/boom", headers={"X-Request-ID": "log-me"})
    [record] = [r for r in caplog.records if r.name == "gateway_guard"]
    assert record.request_id == "log-me"  # type: ignore[attr-defined]
    assert record.upstream == upstream  # type: ignore[attr-defined]
    assert record.proxy_error == "connection_refused"  # type: ignore[attr-defined]


# --- the user's own error handlers take precedence ---------------------------------------------


def test_user_errorhandler_for_the_status_wins() -> None:
    app, _ = make_app()
    add_raising_view(app, "/boom", refused())
    add_raising_view(app, "/open", open_breaker())
    received: list[HTTPException] = []

    @app.errorhandler(502)
    def bad_gateway(e: HTTPException) -> ResponseReturnValue:
        received.append(e)
        return {"mine": True, "description": e.description}, 502

    client = app.test_client()
    response = client.get("/boom", headers={"Accept": HTML, "X-Request-ID": "u-1"})
    assert response.status_code == 502
    assert response.get_json() == {"mine": True, "description": received[0].description}
    [e] = received
    assert isinstance(e, UpstreamBadGateway) and isinstance(e, UpstreamHTTPError)
    assert e.code == 502
    assert isinstance(e.error, gg.UpstreamConnectError)
    assert e.__cause__ is e.error
    assert "10.1.2.3" not in (e.description or "")
    # What the user's response lacked, the extension added; what it has, it kept.
    assert response.headers.getlist("X-Request-ID") == ["u-1"]
    assert proxy_status(response.headers["Proxy-Status"]) == (
        "shop",
        {"error": "connection_refused"},
    )
    assert "Retry-After" not in response.headers  # none was known
    # Another status without a handler of its own keeps the branded page.
    response = client.get("/open", headers={"Accept": HTML})
    assert response.status_code == 503
    assert b"<html" in response.data


def test_user_handler_headers_are_kept_and_retry_after_added_on_5xx() -> None:
    app, _ = make_app()
    add_raising_view(app, "/open", open_breaker())

    @app.errorhandler(503)
    def unavailable(e: HTTPException) -> ResponseReturnValue:
        assert isinstance(e, UpstreamServiceUnavailable)
        assert e.retry_after == 13
        if "keep" in (current_app.config.get("MODE") or ""):
            return "maintenance", 503, {"Proxy-Status": "mine", "Retry-After": "60"}
        if "ok" in (current_app.config.get("MODE") or ""):
            return "served from cache", 200
        return "maintenance", 503

    client = app.test_client()
    response = client.get("/open")
    assert (response.status_code, response.data) == (503, b"maintenance")
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "destination_unavailable"}
    assert response.headers["Retry-After"] == "13"
    app.config["MODE"] = "keep"
    response = client.get("/open")
    assert response.headers.getlist("Proxy-Status") == ["mine"]
    assert response.headers.getlist("Retry-After") == ["60"]
    app.config["MODE"] = "ok"
    response = client.get("/open")
    assert response.status_code == 200
    assert "Retry-After" not in response.headers  # only on a 5xx
    assert "Proxy-Status" in response.headers  # the upstream still failed


def test_blueprint_errorhandler_wins_for_its_own_routes() -> None:
    app, _ = make_app()
    shop = Blueprint("shop", __name__, url_prefix="/shop")
    inner = Blueprint("inner", __name__, url_prefix="/inner")
    add_raising_view(shop, "/boom", refused())
    add_raising_view(inner, "/boom", refused())
    add_raising_view(app, "/boom", refused())

    @shop.errorhandler(502)
    def shop_bad_gateway(e: UpstreamHTTPError) -> ResponseReturnValue:
        return f"shop handled {e.error.proxy_error}", 502

    shop.register_blueprint(inner)
    app.register_blueprint(shop)
    client = app.test_client()
    response = client.get("/shop/boom", headers={"Accept": HTML})
    assert response.data == b"shop handled connection_refused"
    assert "Proxy-Status" in response.headers and "X-Request-ID" in response.headers
    response = client.get("/shop/inner/boom", headers={"Accept": HTML})  # nested: inherits
    assert response.data == b"shop handled connection_refused"
    response = client.get("/boom", headers={"Accept": HTML})  # outside the blueprint
    assert response.status_code == 502 and b"<html" in response.data


def test_blueprint_handler_beats_the_app_handler() -> None:
    app, _ = make_app()
    bp = Blueprint("bp", __name__)
    add_raising_view(bp, "/bp", refused())
    add_raising_view(app, "/app", refused())
    bp.register_error_handler(502, lambda e: ("blueprint", 502))
    app.register_error_handler(502, lambda e: ("app", 502))
    app.register_blueprint(bp)
    client = app.test_client()
    assert client.get("/bp").data == b"blueprint"
    assert client.get("/app").data == b"app"


def test_handler_for_the_exception_classes_wins_and_can_return_the_branded_page() -> None:
    app, _ = make_app()
    add_raising_view(app, "/boom", refused())
    add_raising_view(app, "/open", open_breaker())
    seen: list[str] = []

    @app.errorhandler(UpstreamHTTPError)
    def any_gateway_error(e: UpstreamHTTPError) -> ResponseReturnValue:
        seen.append(f"{e.code} {e.error.upstream}")
        return e  # only log: the branded page, headers included

    client = app.test_client()
    response = client.get("/boom", headers={"Accept": JSON, "X-Request-ID": "cls-1"})
    assert response.status_code == 502
    assert response.content_type == "application/problem+json"
    assert response.headers.getlist("X-Request-ID") == ["cls-1"]
    assert client.get("/open").status_code == 503
    assert seen == ["502 up", "503 up"]


def test_catch_all_handlers_receive_gateway_errors_as_flask_chooses() -> None:
    # Flask's precedence: a catch-all HTTPException handler answers HTTP errors, ours too.
    app, _ = make_app()
    add_raising_view(app, "/boom", refused())
    app.register_error_handler(HTTPException, lambda e: ("generic http", 500))
    app.register_error_handler(Exception, lambda e: ("generic", 500))
    response = app.test_client().get("/boom", headers={"Accept": HTML})
    assert (response.status_code, response.data) == (500, b"generic http")
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "connection_refused"}


def test_async_user_error_handler() -> None:
    app, _ = make_app()
    add_raising_view(app, "/boom", refused())

    @app.errorhandler(502)
    async def bad_gateway(e: HTTPException) -> ResponseReturnValue:
        return "async handler", 502

    assert app.test_client().get("/boom").data == b"async handler"


@pytest.mark.parametrize("when", ["before", "after"])
def test_user_handler_for_upstream_error_replaces_ours(when: str) -> None:
    app = new_app("own", settings())
    if when == "before":
        app.register_error_handler(gg.UpstreamError, lambda e: ("entirely mine", 418))
    GatewayGuard(app)
    if when == "after":
        app.register_error_handler(gg.UpstreamError, lambda e: ("entirely mine", 418))
    add_raising_view(app, "/boom", refused())
    assert app.test_client().get("/boom").status_code == 418


def test_user_handler_wins_with_brand_app_errors() -> None:
    app, _ = make_app(brand_app_errors=True)
    add_raising_view(app, "/boom", refused())
    app.register_error_handler(502, lambda e: ("mine", 502))
    assert app.test_client().get("/boom").data == b"mine"


# --- per-view policies ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_policy_limits_attempts(no_backoff: None, kind: str) -> None:
    app, ext = make_app()
    transport, seen = counting(503)

    def call_upstream() -> str:
        with ext.guard.client("up", transport=transport) as client:
            return client.get("/").text

    async def acall_upstream() -> str:
        async with ext.guard.async_client("up", transport=transport) as client:
            return (await client.get("/")).text

    def default() -> str:
        return call_upstream()

    async def adefault() -> str:
        return await acall_upstream()

    @ext.policy(retry={"attempts": 1})
    def once() -> str:
        return call_upstream()

    @ext.policy(retry={"attempts": 1})
    async def aonce() -> str:
        return await acall_upstream()

    sync = kind == "sync"
    app.add_url_rule("/default", view_func=default if sync else adefault)
    app.add_url_rule("/once", view_func=once if sync else aonce)

    client = app.test_client()
    assert client.get("/once").status_code == 502
    assert len(seen) == 1
    seen.clear()
    assert client.get("/default").status_code == 502
    assert len(seen) == 3


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_policy_depends_on_answers_503_without_running_the_view(kind: str) -> None:
    app, ext = make_app()
    ran: list[str] = []

    @ext.policy(depends_on=["up"])
    def pay() -> str:
        ran.append("pay")
        return "paid"

    @ext.policy(depends_on=["up"])
    async def apay() -> str:
        ran.append("pay")
        return "paid"

    app.add_url_rule("/pay", view_func=pay if kind == "sync" else apay)

    client = app.test_client()
    assert client.get("/pay").data == b"paid"
    ext.guard.breaker("up").force_open()
    response = client.get("/pay", headers={"Accept": JSON})
    assert response.status_code == 503
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "destination_unavailable"}
    assert int(response.headers["Retry-After"]) >= 1
    assert ran == ["pay"]


def test_policy_in_method_view_decorators(no_backoff: None) -> None:
    app, ext = make_app()
    transport, seen = counting(503)

    class Items(MethodView):
        decorators: ClassVar[list[Callable[..., Any]]] = [ext.policy(retry={"attempts": 1})]

        def get(self) -> str:
            with ext.guard.client("up", transport=transport) as client:
                return client.get("/").text

    app.add_url_rule("/items", view_func=Items.as_view("items"))
    assert ext.validate_policies(app) == 1
    assert app.test_client().get("/items").status_code == 502
    assert len(seen) == 1


def test_policy_deadline_applies_only_while_the_view_runs() -> None:
    app, ext = make_app()
    seen: list[tuple[str, float | None]] = []

    def record() -> None:
        ctx = gg.current_context()
        assert ctx is not None and ctx.route is not None
        deadline = ctx.deadline_at - ext.guard.clock() if ctx.deadline_at else None
        seen.append((ctx.route.name, deadline))

    @app.get("/fast")
    @ext.policy(deadline=2)
    def fast() -> str:
        record()
        return "ok"

    app.test_client().get("/fast")
    [(name, remaining)] = seen
    assert name == "fast"  # the endpoint names the view
    assert remaining is not None and 0 < remaining <= 2


def test_bad_policy_fails_at_init_app_for_views_already_registered() -> None:
    app = new_app("bad-policy")
    app.config["GATEWAY_GUARD"] = settings()
    ext = GatewayGuard()

    @app.get("/a")
    @ext.policy(retry={"attempts": 0})
    def a() -> str:
        return "a"

    @app.get("/b")
    @ext.policy(depends_on=["nope"])
    def b() -> str:
        return "b"

    with pytest.raises(gg.SettingsError) as info:
        ext.init_app(app)
    paths = {p.path for p in info.value.problems}
    assert {"view a.retry.attempts", "view b.depends_on.0"} <= paths, paths


def test_bad_policy_on_a_later_view_fails_at_validate_or_first_call() -> None:
    app, ext = make_app()
    app.testing = True  # exceptions propagate to the test client

    @app.get("/later")
    @ext.policy(retry={"attempts": 0})
    def later() -> str:
        return "never"

    with pytest.raises(gg.SettingsError, match=r"view later\.retry\.attempts"):
        ext.validate_policies(app)
    with pytest.raises(gg.SettingsError, match=r"view later\.retry\.attempts"):
        app.test_client().get("/later")


@pytest.mark.implementation
def test_policies_are_compiled_once_per_app_and_view(monkeypatch: pytest.MonkeyPatch) -> None:
    ext = GatewayGuard()
    bp = Blueprint("bp", __name__)
    compiled: list[tuple[str, str]] = []

    @bp.get("/v")
    @ext.policy(retry={"attempts": 1})
    def v() -> str:
        ctx = gg.current_context()
        assert ctx is not None and ctx.route is not None
        policy = ctx.route.calls["up"]
        return f"{ctx.route.name} {policy.retry.attempts} {policy.read_timeout}"

    apps = []
    for service, read_timeout in (("one", 1.0), ("two", 2.0)):
        app = new_app(service, settings(service=service))
        app.config["GATEWAY_GUARD"]["upstreams"]["up"]["read_timeout"] = read_timeout
        ext.init_app(app)
        app.register_blueprint(bp)  # after init_app: compiled on its first request
        guard = get_guard(app)

        def spy(view: str, _orig: Any = guard.view_policy, _s: str = service, **kw: Any) -> Any:
            compiled.append((_s, view))
            return _orig(view, **kw)

        monkeypatch.setattr(guard, "view_policy", spy)
        apps.append(app)
    for app, expected in zip(apps, (b"bp.v 1 1.0", b"bp.v 1 2.0"), strict=True):
        client = app.test_client()
        assert [client.get("/v").data for _ in range(3)] == [expected] * 3
    # Once per app, each against its own Guard's settings.
    assert compiled == [("one", "bp.v"), ("two", "bp.v")]
    assert ext.validate_policies(apps[0]) == 1  # already compiled: no new compile
    assert compiled == [("one", "bp.v"), ("two", "bp.v")]


def test_policy_outside_a_request_calls_the_view() -> None:
    app, ext = make_app()
    ext.guard.breaker("up").force_open()  # inside a request, the view would not run

    @ext.policy(depends_on=["up"])
    def view(x: int) -> int:
        return x + 1

    assert view(1) == 2
    with app.app_context():
        assert view(1) == 2
    assert getattr(view, "__name__", None) == "view"


# --- async views ---------------------------------------------------------------------------------


def test_async_view_sees_the_context_and_uses_a_guarded_async_client() -> None:
    app, ext = make_app()
    outbound: list[str | None] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        outbound.append(request.headers.get("x-request-id"))
        if request.url.path == "/fail":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return httpx.Response(200, json={"n": 1})

    transport = httpx.MockTransport(upstream)

    @app.get("/<path:what>")
    async def view(what: str) -> dict[str, Any]:
        ctx = gg.current_context()  # asgiref's async_to_sync copies the contextvars
        assert ctx is not None
        assert gg.current_guard() is ext.guard
        async with ext.guard.async_client("up", transport=transport) as client:
            data = (await client.get(f"/{what}")).json()
        return {"rid": ctx.request_id, **data}

    client = app.test_client()
    response = client.get("/ok", headers={"X-Request-ID": "async-1"})
    assert response.get_json() == {"rid": "async-1", "n": 1}
    response = client.get("/fail", headers={"X-Request-ID": "async-2", "Accept": JSON})
    assert response.status_code == 502
    assert proxy_status(response.headers["Proxy-Status"])[1] == {"error": "connection_refused"}
    assert response.headers.getlist("X-Request-ID") == ["async-2"]
    assert outbound[0] == "async-1" and set(outbound[1:]) == {"async-2"}
    assert gg.current_context() is None  # reset after the request


# --- the example app ----------------------------------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "flask_app_example", ROOT / "examples" / "flask_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example_app(upstream: MisbehavingUpstream) -> Iterator[Flask]:
    app: Flask = load_example().create_app(upstream.url)
    app.test_client_class = BufferedClient
    try:
        yield app
    finally:
        app.extensions["catalog_client"].close()


@pytest.mark.e2e
def test_example_app(example_app: Flask, upstream: MisbehavingUpstream, no_backoff: None) -> None:
    client = example_app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert b"Sencha" in client.get("/").data
    assert client.get("/api/items").get_json()["catalog"]["request_number"] >= 1
    upstream.set_mode("refuse")
    response = client.get("/api/items", headers={"Accept": JSON})
    assert response.status_code == 502
    assert proxy_status(response.headers["Proxy-Status"]) == (
        "demo-shop",
        {"error": "connection_refused"},
    )


# --- docs/flask.md --------------------------------------------------------------------------------

DOC = ROOT / "docs" / "flask.md"


def doc_blocks() -> list[str]:
    return re.findall(r"^ *```python\n(.*?)^ *```", DOC.read_text(encoding="utf-8"), re.M | re.S)


def test_doc_python_blocks_compile() -> None:
    blocks = doc_blocks()
    assert len(blocks) >= 5
    for block in blocks:
        compile(textwrap.dedent(block), str(DOC), "exec")


@pytest.mark.e2e
def test_doc_quickstart_and_testing_tip_work(
    upstream: MisbehavingUpstream, monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    monkeypatch.setenv("UPSTREAM_URL", upstream.url)
    quickstart, *rest = doc_blocks()
    namespace: dict[str, Any] = {"__name__": "quickstart"}
    exec(compile(quickstart, str(DOC), "exec"), namespace)
    app: Flask = namespace["create_app"]()
    app.test_client_class = BufferedClient
    try:
        assert app.test_client().get("/api/items").status_code == 200
        assert app.test_client().get("/healthz").get_json() == {"status": "ok"}
    finally:
        app.extensions["catalog"].close()
    [tip] = [block for block in rest if "def test_items_upstream_down" in block]
    namespace["httpx"] = httpx
    exec(compile(textwrap.dedent(tip), str(DOC), "exec"), namespace)
    try:
        namespace["test_items_upstream_down"](app)
    finally:
        app.extensions["catalog"].close()


# --- end to end: cheroot + the misbehaving upstream ---------------------------------------------

SHORT_READ = 0.25
QUIET_BREAKER = {"window_size": 1000, "min_calls": 1000, "consecutive_timeouts": 0}


def e2e_app(upstream: MisbehavingUpstream, **up_settings: Any) -> tuple[Flask, GatewayGuard]:
    app = new_app("e2e")
    app.config["GATEWAY_GUARD"] = {
        "service": "shop",
        "upstreams": {"up": {"base_url": upstream.url, **up_settings}},
    }
    ext = GatewayGuard(app)

    @app.get("/items")
    def items() -> Any:
        with ext.guard.client("up") as client:
            return {"upstream": client.get("/items").json()["request_number"]}

    return app, ext


@pytest.fixture
def browser() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=WAIT, trust_env=False) as client:
        yield client


Case = tuple[str, dict[str, Any], dict[str, Any], int, str | None, dict[str, Any], str | None]
E2E_CASES: dict[str, Case] = {
    # name: (mode, mode options, upstream settings, status, error, other params, Retry-After)
    "refuse": ("refuse", {}, {}, 502, "connection_refused", {}, None),
    "hang": ("hang", {}, {"read_timeout": SHORT_READ}, 504, "connection_read_timeout", {}, None),
    "reset": ("reset", {}, {}, 502, "connection_terminated", {}, None),
    "garbage": ("garbage", {}, {}, 502, "http_protocol_error", {}, None),
    "truncated": ("truncated", {}, {}, 502, "http_response_incomplete", {}, None),
    "status503": (
        "status",
        {"status": 503, "retry_after": "2"},
        {},
        502,
        None,
        {"received-status": 503},
        "2",
    ),
}


def check_gateway_response(
    response: httpx.Response,
    status: int,
    error: str | None,
    params: dict[str, Any],
    retry_after: str | None,
    rid: str,
    accept: str,
) -> None:
    assert response.status_code == status, response.text
    member, got = proxy_status(response.headers["proxy-status"])
    assert member == "shop"
    assert got == ({"error": error} if error else {}) | params
    assert response.headers.get("retry-after") == retry_after
    assert response.headers.get_list("x-request-id") == [rid]
    assert response.headers["cache-control"] == "no-store"
    if accept == HTML:
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert "<html" in response.text and rid in response.text
    else:
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert (problem["status"], problem["instance"]) == (status, f"urn:request:{rid}")
        assert problem.get("proxy_error") == error


@pytest.mark.e2e
@pytest.mark.parametrize("case", E2E_CASES.values(), ids=E2E_CASES.keys())
def test_e2e_failure_modes(
    upstream: MisbehavingUpstream, browser: httpx.Client, no_backoff: None, case: Case
) -> None:
    mode, options, up_settings, status, error, params, retry_after = case
    app, _ = e2e_app(upstream, retry={"attempts": 2}, breaker=QUIET_BREAKER, **up_settings)
    with serve_wsgi(app) as url:
        assert browser.get(f"{url}/items").status_code == 200
        upstream.set_mode(mode, **options)
        for accept in (HTML, JSON):
            rid = f"e2e-{mode}-{accept.split('/')[1]}"
            response = browser.get(f"{url}/items", headers={"Accept": accept, "X-Request-ID": rid})
            check_gateway_response(response, status, error, params, retry_after, rid, accept)


def streamed_gateway_error(browser: httpx.Client) -> httpx.Response:
    # A real server: werkzeug's test client re-raises on any start_response(exc_info),
    # even before the headers are sent (PEP 3333 allows a new status until then).
    app, _ = make_app()

    @app.get("/stream")
    def stream() -> ResponseReturnValue:
        def body() -> Iterator[str]:
            raise refused()
            yield "never"  # a generator: it runs after the view returned

        return stream_with_context(body())

    with serve_wsgi(app) as url:
        # Past Flask's error handlers: the WSGI wrapper renders it.
        response = browser.get(f"{url}/stream", headers={"Accept": JSON, "X-Request-ID": "s-1"})
    assert response.status_code == 502
    assert proxy_status(response.headers["proxy-status"])[1] == {"error": "connection_refused"}
    assert response.json()["proxy_error"] == "connection_refused"
    assert "s-1" in response.headers.get_list("x-request-id")
    return response


@pytest.mark.e2e
def test_gateway_error_in_a_streamed_body_before_the_first_chunk(browser: httpx.Client) -> None:
    streamed_gateway_error(browser)


@pytest.mark.e2e
def test_streamed_gateway_error_has_only_the_error_pages_headers(browser: httpx.Client) -> None:
    response = streamed_gateway_error(browser)
    assert response.headers.get_list("content-type") == ["application/problem+json"]
    assert response.headers.get_list("x-request-id") == ["s-1"]


@pytest.mark.e2e
def test_e2e_breaker_opens_answers_fast_and_recovers(
    upstream: MisbehavingUpstream, browser: httpx.Client, no_backoff: None
) -> None:
    app, ext = e2e_app(
        upstream,
        retry={"attempts": 1},
        breaker={
            "window_size": 4,
            "min_calls": 4,
            "failure_rate": 0.5,
            "open_seconds": 0.5,
            "half_open_calls": 1,
        },
    )
    breaker = ext.guard.breaker("up")
    with serve_wsgi(app) as url:
        upstream.set_mode("status", status=500)
        for _ in range(4):
            response = browser.get(f"{url}/items", headers={"Accept": JSON})
            assert response.status_code == 502
            assert proxy_status(response.headers["proxy-status"])[1] == {"received-status": 500}
        assert breaker.state is gg.BreakerState.OPEN
        before = upstream.stats().requests
        for accept in (HTML, JSON):
            started = time.perf_counter()
            response = browser.get(f"{url}/items", headers={"Accept": accept, "X-Request-ID": "br"})
            assert time.perf_counter() - started < 0.4  # no upstream call, no waiting
            check_gateway_response(response, 503, "destination_unavailable", {}, "1", "br", accept)
        assert upstream.stats().requests == before  # answered without touching it
        upstream.set_mode("ok")
        deadline = time.monotonic() + WAIT
        while breaker.state is gg.BreakerState.OPEN:
            assert time.monotonic() < deadline, "the breaker never left open"
            time.sleep(0.05)
        response = browser.get(f"{url}/items")
        assert response.status_code == 200
        assert breaker.state is gg.BreakerState.CLOSED
        assert upstream.stats().requests == before + 1


@pytest.mark.e2e
def test_e2e_forced_open_breaker_and_depends_on_policy(
    upstream: MisbehavingUpstream, browser: httpx.Client
) -> None:
    app, ext = e2e_app(upstream)

    @app.get("/checkout")
    @ext.policy(depends_on=["up"])
    def checkout() -> str:
        raise AssertionError("the view must not run while its dependency is down")

    ext.guard.breaker("up").force_open()
    before = upstream.stats().requests
    with serve_wsgi(app) as url:
        for path in ("/items", "/checkout"):
            for accept in (HTML, JSON):
                response = browser.get(
                    f"{url}{path}", headers={"Accept": accept, "X-Request-ID": "fo"}
                )
                assert response.status_code == 503
                _, params = proxy_status(response.headers["proxy-status"])
                assert params == {"error": "destination_unavailable"}
                assert int(response.headers["retry-after"]) >= 1
                assert response.headers.get_list("x-request-id") == ["fo"]
    assert upstream.stats().requests == before


@pytest.mark.e2e
def test_e2e_shedding_under_concurrency(upstream: MisbehavingUpstream) -> None:
    shed_app = new_app("shed")
    shed_app.config["GATEWAY_GUARD"] = {
        "service": "shop",
        "upstreams": {"up": {"base_url": upstream.url}},
        "shed": {"max_concurrent": 1, "max_queue": 0},
    }
    ext = GatewayGuard(shed_app)

    @shed_app.get("/items")
    def items() -> Any:
        with ext.guard.client("up") as client:
            return client.get("/items").json()

    upstream.set_mode("slow", delay_ms=400)
    with serve_wsgi(shed_app) as url, httpx.Client(timeout=WAIT, trust_env=False) as c:
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(c.get(f"{url}/items")))
        first.start()
        deadline = time.monotonic() + WAIT
        while upstream.stats().requests == 0:  # the first request holds the only slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
        shed = c.get(f"{url}/items", headers={"Accept": JSON})
        first.join(WAIT)
    assert shed.status_code == 503
    assert proxy_status(shed.headers["proxy-status"])[1] == {"error": "connection_limit_reached"}
    assert [r.status_code for r in results] == [200]


class _GeventLikeTimeout(BaseException):
    """Like gevent's Timeout: a BaseException, so ``except Exception`` lets it through."""


@pytest.mark.parametrize("error", [SystemExit(1), KeyboardInterrupt(), _GeventLikeTimeout()])
def test_a_base_exception_in_a_view_releases_the_slot(error: BaseException) -> None:
    app, ext = make_app(shed={"max_concurrent": 3, "max_queue": 0})

    @app.get("/boom")
    def boom() -> ResponseReturnValue:
        raise error

    @app.get("/ok")
    def ok() -> ResponseReturnValue:
        return "ok"

    client = app.test_client()
    for _ in range(3):
        with pytest.raises(type(error)):
            client.get("/boom")
    assert ext.guard.shedding.app.in_flight == 0
    assert client.get("/ok").status_code == 200
