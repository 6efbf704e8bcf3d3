"""A FastAPI shop whose catalog service misbehaves on demand, guarded by gateway_guard.

Run it (with the misbehaving upstream it calls, ``python examples/upstream.py``, in another
terminal; or run both at once with ``python examples/demo.py``)::

    python examples/fastapi_app.py            # http://127.0.0.1:8000/
    UPSTREAM_URL=http://127.0.0.1:9201 python examples/fastapi_app.py --port 8001
    uvicorn --factory fastapi_app:create_app --app-dir examples   # the same app

Needs ``pip install gateway-guard fastapi uvicorn``. What it shows:

- ``app.add_middleware(GatewayGuardMiddleware, guard=guard)``: request ids, load shedding
  and the branded 502/503/504 pages for every upstream failure the app does not handle;
- one guarded ``httpx.AsyncClient`` for the ``catalog`` upstream, owned by the app's
  lifespan (so connections are reused) and handed to endpoints by a FastAPI dependency;
- ``gateway_guard.current_guard()``, to reach the Guard from anywhere in a request;
- per-route policies (``[[routes]]``): ``/shop`` and ``/api/...`` depend on ``catalog``, so
  while its breaker is open they answer 503 at once, without calling it.

Routes: ``/`` explains the demo (and shows the breaker's state), ``/shop`` is an HTML page
and ``/api/items`` a JSON API, both calling the upstream, ``/healthz`` a health check.
Tests build the app with :func:`create_app`, whose keyword arguments override settings.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse

import gateway_guard as gg

DEFAULT_UPSTREAM_URL = "http://127.0.0.1:9101"
# Only shown on the landing page, in the commands that switch the upstream's mode.
DEFAULT_CONTROL_URL = "http://127.0.0.1:9102"
UPSTREAM = "catalog"

# The settings, as a mapping. The same thing as a settings file would read:
#
#     service = "demo-shop"
#     [brand]
#     name = "Acme Demo Shop"
#     accent_color = "#0f766e"
#     status_url = "https://status.example.com"
#     support_url = "https://example.com/support"
#
#     [defaults]
#     connect_timeout = 1.0
#
#     [upstreams.catalog]
#     base_url = "http://127.0.0.1:9101"
#     read_timeout = 2.0
#     deadline = 5.0
#     retry = { attempts = 3, backoff_initial = 0.1, backoff_max = 0.5 }
#     breaker = { window_size = 10, min_calls = 5, failure_rate = 0.5, open_seconds = 10.0 }
#
#     [shed]
#     max_concurrent = 50
#     max_queue = 100
#     queue_timeout = 1.0
#
#     [[routes]]
#     path = "/shop"
#     priority = "critical"
#     depends_on = ["catalog"]
#
#     [[routes]]
#     path = "/api/{rest:path}"
#     priority = "sheddable"
#     depends_on = ["catalog"]
#
# and with that file, ``guard = gg.Guard("gateway_guard.toml")``. Either way, operators
# can still change one key from the environment: GATEWAY_GUARD__SHED__MAX_CONCURRENT=20.
# The breaker's thresholds are small so that it visibly opens after a few failed calls.
SETTINGS: dict[str, Any] = {
    "service": "demo-shop",
    "brand": {
        "name": "Acme Demo Shop",
        "accent_color": "#0f766e",
        "status_url": "https://status.example.com",
        "support_url": "https://example.com/support",
    },
    "defaults": {"connect_timeout": 1.0},
    "upstreams": {
        UPSTREAM: {
            "base_url": DEFAULT_UPSTREAM_URL,
            "read_timeout": 2.0,
            "deadline": 5.0,
            "retry": {"attempts": 3, "backoff_initial": 0.1, "backoff_max": 0.5},
            "breaker": {
                "window_size": 10,
                "min_calls": 5,
                "failure_rate": 0.5,
                "open_seconds": 10.0,
            },
        }
    },
    "shed": {"max_concurrent": 50, "max_queue": 100, "queue_timeout": 1.0},
    "routes": [
        {"path": "/shop", "priority": "critical", "depends_on": [UPSTREAM]},
        {"path": "/api/{rest:path}", "priority": "sheddable", "depends_on": [UPSTREAM]},
    ],
}

# The upstream is a stand-in that echoes requests, so the items themselves live here.
ITEMS = (
    {"sku": "TEA-01", "name": "Sencha green tea, 100 g", "price": "8.50"},
    {"sku": "MUG-02", "name": "Stoneware mug", "price": "14.00"},
    {"sku": "POT-03", "name": "Cast-iron teapot", "price": "39.00"},
)

MODES = (
    ("ok", "answers at once", "200"),
    ("slow", "answers after delay_ms (over the 2 s read timeout: a timeout)", "200 or 504"),
    ("hang", "never answers", "504 connection_read_timeout"),
    ("refuse", "is down: connections are refused", "502 connection_refused"),
    ("reset", "resets the connection", "502 connection_terminated"),
    ("garbage", "answers bytes that are not HTTP", "502 http_protocol_error"),
    ("truncated", "stops in the middle of its answer", "502 http_response_incomplete"),
    ("status", "answers a status (503 by default)", "502 received-status=503"),
    ("flaky", "fails failure_percent % of requests", "200 (retried) or 502"),
)


def build_settings(upstream_url: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The example's settings, with ``upstream_url`` and ``overrides`` merged in.

    ``upstream_url`` defaults to ``$UPSTREAM_URL``, then ``http://127.0.0.1:9101``.
    ``overrides`` are top-level settings keys, merged table by table, e.g.
    ``upstreams={"catalog": {"read_timeout": 0.3}}`` changes only that timeout.
    """
    url = upstream_url or os.environ.get("UPSTREAM_URL") or DEFAULT_UPSTREAM_URL
    settings = _merge(SETTINGS, {"upstreams": {UPSTREAM: {"base_url": url}}})
    return _merge(settings, overrides)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


def create_app(upstream_url: str | None = None, **overrides: Any) -> FastAPI:
    """Build the example app; see :func:`build_settings` for the arguments."""
    # Invalid settings fail here, at startup, with a SettingsError naming the key.
    guard = gg.Guard(build_settings(upstream_url, **overrides))
    control_url = os.environ.get("UPSTREAM_CONTROL_URL", DEFAULT_CONTROL_URL)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One client for the app's lifetime: its connection pool is reused by every
        # request. Breakers, budgets and bulkheads live in the Guard, so a second client
        # of the same upstream would share them anyway; connections it would not.
        async with guard.async_client(UPSTREAM) as catalog:
            app.state.catalog = catalog
            yield

    app = FastAPI(title="gateway_guard FastAPI example", lifespan=lifespan)
    app.state.guard = guard
    # add_middleware, not app = GatewayGuardMiddleware(app): Starlette keeps its
    # ServerErrorMiddleware outermost, and only inside it does ours see an upstream error
    # first. Wrapped from outside, ServerErrorMiddleware would answer a bare 500 before
    # ours could answer the 502/504. (A real bug in the app still becomes that 500.)
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)

    @app.get("/", response_class=HTMLResponse)
    async def landing() -> HTMLResponse:
        return HTMLResponse(_landing_page(control_url))

    @app.get("/shop", response_class=HTMLResponse)
    async def shop(catalog: Catalog) -> HTMLResponse:
        upstream, elapsed = await _call_catalog(catalog)
        rows = "".join(
            f"<tr><td>{_e(item['name'])}</td><td>{_e(item['sku'])}</td>"
            f"<td class=num>{_e(item['price'])}</td></tr>"
            for item in ITEMS
        )
        body = (
            "<h1>Shop</h1>"
            f"<p>The catalog answered in {elapsed * 1000:.0f} ms "
            f"(its request #{_e(upstream.get('request_number'))}).</p>"
            f"<table><tr><th>Item</th><th>SKU</th><th class=num>Price</th></tr>{rows}</table>"
            '<p><a href="/">Back to the demo</a></p>'
        )
        return HTMLResponse(_page("Shop", body))

    @app.get("/api/items")
    async def items(catalog: Catalog) -> dict[str, Any]:
        upstream, elapsed = await _call_catalog(catalog)
        return {
            "items": list(ITEMS),
            "catalog": {
                "request_number": upstream.get("request_number"),
                "elapsed_ms": round(elapsed * 1000, 1),
            },
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Exempt from load shedding (the default [shed] exempt list), and it calls no
        # upstream: the process is healthy even while the catalog is not.
        return {"status": "ok"}

    return app


def get_catalog(request: Request) -> httpx.AsyncClient:
    """FastAPI dependency: the app's guarded client of the catalog upstream."""
    client: httpx.AsyncClient = request.app.state.catalog
    return client


Catalog = Annotated[httpx.AsyncClient, Depends(get_catalog)]


async def _call_catalog(catalog: httpx.AsyncClient) -> tuple[dict[str, Any], float]:
    # No try/except: when the catalog fails for good (retries spent, breaker open, load
    # shed), the guarded client raises a gg.UpstreamError and the middleware answers with
    # the branded page (browsers) or problem+json (API clients).
    started = time.perf_counter()
    response = await catalog.get("/items")
    elapsed = time.perf_counter() - started
    try:
        data = response.json()
    except ValueError:  # `status` mode with a text body, say: show the items anyway
        data = None
    return (data if isinstance(data, dict) else {}), elapsed


def _e(value: object) -> str:
    # Everything interpolated into HTML goes through here.
    return html.escape(str(value))


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · Acme Demo Shop</title>
<style>
body {{ font: 1rem/1.6 system-ui, sans-serif; max-width: 48rem; margin: 2rem auto;
  padding: 0 1rem; color: #111827; }}
h1, h2 {{ line-height: 1.25; }}
a {{ color: #0f766e; }}
code, pre {{ font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em; }}
pre {{ background: #f3f4f6; padding: .75rem; overflow-x: auto; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .25rem .75rem .25rem 0;
  border-bottom: 1px solid #d1d5db; }}
.num {{ text-align: right; }}
.state {{ font-weight: 600; }}
</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""


def _landing_page(control_url: str) -> str:
    # current_guard() reaches the Guard serving this request from anywhere in it, without
    # passing it around (LookupError outside a request).
    breaker = gg.current_guard().breaker(UPSTREAM)
    state = breaker.state.value
    retry_after = breaker.retry_after()
    if retry_after is not None:
        state += f" (half-open in {retry_after:.0f} s)"
    modes = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>{_e(does)}</td><td>{_e(sees)}</td></tr>"
        for name, does, sees in MODES
    )
    port = urlsplit(control_url).port
    flags = "" if control_url == DEFAULT_CONTROL_URL else f" --control-port {port}"
    curl = (
        f"curl -s {control_url}/mode\n"
        f"curl -s -X POST {control_url}/mode -H 'content-type: application/json' \\\n"
        '     -d \'{"mode": "status", "status": 503, "retry_after": 5}\''
    )
    body = f"""<h1>gateway_guard FastAPI demo</h1>
<p>This shop calls one upstream, <code>catalog</code>, through a guarded httpx client.
The catalog is a misbehaving test server: switch its mode, then load
<a href="/shop">/shop</a> (an HTML page) or <a href="/api/items">/api/items</a> (JSON) and
see what your visitors get: retries first, then an honest, branded 502/503/504 page or
problem+json, with <code>Proxy-Status</code>, <code>Retry-After</code> and
<code>X-Request-ID</code> headers (<code>curl -i</code> shows them).</p>

<h2>Circuit breaker</h2>
<p>The catalog's breaker is <span class="state">{_e(state)}</span>. Reload this page to
see it change. After 5 failed calls in the last 10 it opens: <code>/shop</code> and
<code>/api/items</code> then answer 503 at once, without calling the catalog, for 10
seconds; then a few probe calls decide whether it closes again.</p>

<h2>Upstream modes</h2>
<table><tr><th>mode</th><th>the catalog…</th><th>visitors get</th></tr>{modes}</table>

<h2>Switch modes</h2>
<pre>python examples/demo.py mode hang{_e(flags)}
python examples/demo.py mode status --status 503 --retry-after 5{_e(flags)}
python examples/demo.py mode ok{_e(flags)}</pre>
<p>or with curl, against the upstream's control port:</p>
<pre>{_e(curl)}</pre>
<p>Health check: <a href="/healthz">/healthz</a> (never shed, calls no upstream).</p>
"""
    return _page("Demo", body)


class _OneLine(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return ""  # one line per event on the demo's console


def _console_logging() -> None:
    # gateway_guard logs breaker transitions (INFO/WARNING) and gateway errors (ERROR, with
    # the cause's traceback) to the "gateway_guard" logger. The demo shows them beside
    # uvicorn's lines, one line each; a real app keeps the tracebacks in its own setup.
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine("%(levelname)-9s gateway_guard: %(message)s"))
    logger = logging.getLogger("gateway_guard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The gateway_guard FastAPI example app.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--upstream-url",
        help=f"the catalog upstream (default: $UPSTREAM_URL or {DEFAULT_UPSTREAM_URL})",
    )
    args = parser.parse_args(argv)
    _console_logging()
    uvicorn.run(create_app(args.upstream_url), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
