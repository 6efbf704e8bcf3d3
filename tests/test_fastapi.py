"""End to end: the FastAPI example (examples/fastapi_app.py) against the real misbehaving upstream.

The example app is built with its own ``create_app`` (settings overrides where a test needs
shorter times), served by uvicorn on 127.0.0.1 and called over real sockets; what reached
the upstream is read from its exact ``stats()``. Every wait is bounded.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import http_sf
import httpx
import pytest

from gateway_guard.breaker import BreakerState
from gateway_guard.settings import load_settings
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_asgi

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
JSON = {"accept": "application/json"}
HTML = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
BRAND = "Acme Demo Shop"
# Against `hang`: three attempts of this, so a test stays under a second or so.
SHORT_READ = 0.25
# Bounds the wait for a breaker to reach half-open, and any single request.
WAIT = 10.0
# The example's breaker: opens after 5 calls in a window of 10 (at a 50 % failure rate).
MIN_CALLS = 5


def _load_example() -> ModuleType:
    # examples/ is not a package: load the file under a name no other test uses.
    name = "gateway_guard_example_fastapi_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()


@dataclass
class Served:
    url: str
    app: Any  # fastapi.FastAPI
    http: httpx.Client

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.get(self.url + path, headers=headers)

    @property
    def breaker_state(self) -> BreakerState:
        state: BreakerState = self.app.state.guard.breaker("catalog").state
        return state


@contextmanager
def serve(upstream: MisbehavingUpstream, **overrides: Any) -> Iterator[Served]:
    app = example.create_app(upstream.url, **overrides)
    with (
        serve_asgi(app) as url,
        # trust_env=False: loopback only, whatever proxies the environment names.
        httpx.Client(timeout=WAIT, trust_env=False) as http,
    ):
        yield Served(url, app, http)


def proxy_status(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The Proxy-Status member and its parameters, tokens as plain strings."""
    parsed: Any = http_sf.parse(response.headers["proxy-status"].encode(), tltype="list")
    [(member, params)] = parsed
    plain = {key: value if isinstance(value, int) else str(value) for key, value in params.items()}
    return str(member), plain


def assert_gateway_error(response: httpx.Response, status: int, media: str) -> dict[str, Any]:
    """The common shape of every gateway error; returns the Proxy-Status parameters."""
    assert response.status_code == status, response.text[:500]
    member, params = proxy_status(response)
    assert member == "demo-shop"
    request_id = response.headers["x-request-id"]
    assert request_id
    assert response.headers["cache-control"] == "no-store"
    if media == "json":
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == status
        assert problem["request_id"] == request_id
        assert request_id in problem["instance"]
        if "error" in params:
            assert problem["proxy_error"] == params["error"]
    else:
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        assert page.startswith("<!doctype html>")
        assert BRAND in page
        assert request_id in page  # the reference a visitor can quote
        assert "https://status.example.com" in page
    # Production pages never name the upstream.
    assert "127.0.0.1" not in response.text
    return params


# --- the happy path and the landing page ----------------------------------------------------


@pytest.mark.e2e
def test_landing_page_explains_the_demo(upstream: MisbehavingUpstream) -> None:
    with serve(upstream) as served:
        response = served.get("/", HTML)
        health = served.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-request-id"]
    page = response.text
    assert '<html lang="en">' in page
    for text in ('href="/shop"', 'href="/api/items"', "python examples/demo.py mode hang"):
        assert text in page
    for mode in ("hang", "refuse", "reset", "garbage", "truncated", "status", "flaky"):
        assert f"<code>{mode}</code>" in page
    # The live breaker state, read through gateway_guard.current_guard().
    assert '<span class="state">closed</span>' in page
    assert upstream.stats().requests == 0  # the landing page calls no upstream
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


@pytest.mark.e2e
def test_healthy_upstream_serves_json_and_html(upstream: MisbehavingUpstream) -> None:
    with serve(upstream) as served:
        api = served.get("/api/items", JSON)
        shop = served.get("/shop", HTML)
    assert api.status_code == 200
    body = api.json()
    assert [item["sku"] for item in body["items"]] == ["TEA-01", "MUG-02", "POT-03"]
    assert body["catalog"]["request_number"] == 1
    assert api.headers["x-request-id"]
    assert shop.status_code == 200
    assert "Cast-iron teapot" in shop.text
    assert "request #2" in shop.text
    assert upstream.stats().requests == 2


@pytest.mark.e2e
def test_inbound_request_id_is_echoed_on_errors(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("refuse")
    with serve(upstream) as served:
        response = served.get("/api/items", {**JSON, "x-request-id": "demo-request-42"})
    assert_gateway_error(response, 502, "json")
    assert response.headers["x-request-id"] == "demo-request-42"
    assert response.json()["request_id"] == "demo-request-42"


# --- every failure mode, as an API client and as a browser ----------------------------------


@pytest.mark.e2e
def test_landing_page_states_the_breaker_rule_its_settings_apply(
    upstream: MisbehavingUpstream,
) -> None:
    # The page's words come from the policy the app runs with, never written by hand.
    with serve(upstream) as served:
        demo = served.get("/", HTML).text
    assert "at least 50% of the calls in the last 10 calls failed" in demo
    assert "once at least 5 calls were made" in demo
    assert "after 3 timed-out attempts in a row" in demo
    assert "for 10 seconds" in demo
    # 3 attempts x 2 s reads outlast the 5 s deadline: the deadline ends a hung call.
    assert "504 http_response_timeout" in demo
    breaker = {"failure_rate": 0.6, "window_size": 12, "min_calls": 4, "consecutive_timeouts": 0}
    overrides = {"upstreams": {"catalog": {"breaker": breaker, "deadline": 9.0}}}
    with serve(upstream, **overrides) as served:
        tuned = served.get("/", HTML).text
    assert "at least 60% of the calls in the last 12 calls failed" in tuned
    assert "once at least 4 calls were made" in tuned
    assert "timed-out attempts" not in tuned
    assert "504 connection_read_timeout" in tuned


@dataclass(frozen=True)
class Failure:
    mode: str
    options: dict[str, Any]
    status: int
    error: str | None  # the Proxy-Status error type; None when the upstream answered
    received_status: int | None = None
    retry_after: str | None = None


FAILURES = [
    Failure("refuse", {}, 502, "connection_refused"),
    Failure("hang", {}, 504, "connection_read_timeout"),
    Failure("reset", {}, 502, "connection_terminated"),
    Failure("garbage", {}, 502, "http_protocol_error"),
    Failure("truncated", {}, 502, "http_response_incomplete"),
    Failure("status", {"status": 503, "retry_after": "2"}, 502, None, 503, "2"),
]


@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize(
    ("path", "headers", "media"),
    [("/api/items", JSON, "json"), ("/shop", HTML, "html")],
    ids=["api-json", "shop-html"],
)
@pytest.mark.parametrize("failure", FAILURES, ids=[f.mode for f in FAILURES])
@pytest.mark.e2e
def test_failure_mode_answers_a_gateway_error(
    upstream: MisbehavingUpstream,
    failure: Failure,
    path: str,
    headers: dict[str, str],
    media: str,
) -> None:
    upstream.set_mode(failure.mode, **failure.options)
    overrides = {"upstreams": {"catalog": {"read_timeout": SHORT_READ}}}
    with serve(upstream, **overrides) as served:
        started = time.perf_counter()
        response = served.get(path, headers)
        elapsed = time.perf_counter() - started
    params = assert_gateway_error(response, failure.status, media)
    assert params.get("error") == failure.error
    assert params.get("received-status") == failure.received_status
    if failure.retry_after is not None:
        assert response.headers["retry-after"] == failure.retry_after
    if failure.mode == "hang":
        # Three read timeouts, not the app's 5 s deadline or the upstream's patience.
        assert 3 * SHORT_READ <= elapsed < 3 * SHORT_READ + 2.0
    if media == "json" and failure.error is not None:
        assert response.json()["proxy_error"] == failure.error


# --- the breaker ----------------------------------------------------------------------------


def trip(served: Served, upstream: MisbehavingUpstream) -> None:
    """Open the catalog's breaker: 500s are failures the example does not retry."""
    upstream.set_mode("status", status=500)
    for n in range(1, MIN_CALLS + 1):
        response = served.get("/api/items", JSON)
        params = assert_gateway_error(response, 502, "json")
        assert params["received-status"] == 500
        expected = BreakerState.OPEN if n == MIN_CALLS else BreakerState.CLOSED
        assert served.breaker_state == expected, f"after {n} failed calls"
    assert upstream.stats().requests == MIN_CALLS


@pytest.mark.e2e
def test_open_breaker_answers_fast_without_calling_the_upstream(
    upstream: MisbehavingUpstream,
) -> None:
    with serve(upstream) as served:
        trip(served, upstream)
        upstream.set_mode("ok")  # healthy again, but the breaker does not know yet
        before = upstream.stats()
        for path, headers, media in [("/api/items", JSON, "json"), ("/shop", HTML, "html")] * 3:
            started = time.perf_counter()
            response = served.get(path, headers)
            elapsed = time.perf_counter() - started
            params = assert_gateway_error(response, 503, media)
            assert params["error"] == "destination_unavailable"
            # Retry-After: the time left until half-open, at most the 10 s open time.
            assert 1 <= int(response.headers["retry-after"]) <= 10
            assert elapsed < 1.0  # fail fast: no connect, no retries, no backoff
        landing = served.get("/", HTML)
        assert upstream.stats() == before  # not one connection, not one request
    assert '<span class="state">open (half-open in' in landing.text


@pytest.mark.e2e
def test_breaker_recovers_once_the_upstream_is_healthy(upstream: MisbehavingUpstream) -> None:
    open_seconds = 1.0
    overrides = {"upstreams": {"catalog": {"breaker": {"open_seconds": open_seconds}}}}
    with serve(upstream, **overrides) as served:
        trip(served, upstream)
        opened = time.monotonic()
        upstream.set_mode("ok")
        assert served.get("/api/items", JSON).status_code == 503
        # The first success comes once the open time is over (half-open admits probes).
        deadline = opened + WAIT
        response = served.get("/api/items", JSON)
        while response.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
            response = served.get("/api/items", JSON)
        assert response.status_code == 200
        assert time.monotonic() - opened >= open_seconds
        # Three successful probes close it (the default half_open_calls).
        for _ in range(2):
            assert served.get("/shop", HTML).status_code == 200
        assert served.breaker_state is BreakerState.CLOSED
        assert '<span class="state">closed</span>' in served.get("/", HTML).text


# --- the lifespan-owned client --------------------------------------------------------------


@pytest.mark.e2e
def test_lifespan_client_reuses_connections_and_is_closed_on_shutdown(
    upstream: MisbehavingUpstream,
) -> None:
    with serve(upstream) as served:
        for n in range(20):
            path, headers = ("/api/items", JSON) if n % 2 else ("/shop", HTML)
            assert served.get(path, headers).status_code == 200
        client: httpx.AsyncClient = served.app.state.catalog
        assert not client.is_closed
    stats = upstream.stats()
    assert stats.requests == 20
    # One app-wide client: sequential requests share one keep-alive connection. A client
    # per request would open 20.
    assert stats.connections <= 2
    assert client.is_closed  # the lifespan closed it when uvicorn shut down


def test_settings_overrides_merge_table_by_table() -> None:
    settings = example.build_settings(
        "http://127.0.0.1:1", upstreams={"catalog": {"breaker": {"open_seconds": 1.0}}}
    )
    catalog = settings["upstreams"]["catalog"]
    assert catalog["base_url"] == "http://127.0.0.1:1"
    assert catalog["breaker"] == {
        "window_size": 10,
        "min_calls": 5,
        "failure_rate": 0.5,
        "open_seconds": 1.0,
    }
    assert catalog["read_timeout"] == 2.0
    # The module's own mapping is untouched.
    assert example.SETTINGS["upstreams"]["catalog"]["breaker"]["open_seconds"] == 10.0
    json.dumps(settings)  # plain data, as a settings file would hold


# --- docs/fastapi.md ------------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "fastapi.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _doc_blocks(lang: str) -> list[str]:
    return [body for kind, body in _FENCE.findall(DOC.read_text()) if kind == lang]


@pytest.mark.parametrize("number", range(len(_doc_blocks("toml"))))
def test_quickstart_toml_examples_are_valid_settings(number: int) -> None:
    load_settings(tomllib.loads(_doc_blocks("toml")[number]), environ={})


@pytest.mark.parametrize("number", range(len(_doc_blocks("python"))))
def test_quickstart_python_examples_parse(number: int) -> None:
    ast.parse(_doc_blocks("python")[number])
