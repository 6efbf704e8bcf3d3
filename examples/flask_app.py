"""A Flask shop whose catalog service misbehaves on demand, guarded by gateway_guard.

Run it, with the misbehaving upstream it calls in another terminal::

    python examples/upstream.py               # the catalog: data on 9101, control on 9102
    python examples/flask_app.py              # http://127.0.0.1:8001/
    UPSTREAM_URL=http://127.0.0.1:9201 python examples/flask_app.py --port 8002
    flask --app 'examples/flask_app.py:create_app()' run --port 8001   # the same app

    python examples/demo.py mode refuse       # then reload http://127.0.0.1:8001/
    curl -i -H 'Accept: application/json' http://127.0.0.1:8001/api/items

Needs ``pip install 'gateway-guard[flask]'``. What it shows:

- the app-factory pattern: ``ext = GatewayGuard()`` at module level, ``ext.init_app(app)``
  in :func:`create_app`, the settings in ``app.config["GATEWAY_GUARD"]`` (a mapping here;
  a path such as ``"gateway_guard.toml"`` works the same);
- one guarded ``httpx.Client`` for the ``catalog`` upstream per app, kept in
  ``app.extensions`` so its connections are reused by every request;
- ``@ext.policy(...)``: a per-view retry and deadline policy;
- no try/except around upstream calls: a failure the guard cannot recover from becomes
  the branded 502/503/504 page (browsers) or problem+json (API clients), with
  ``Proxy-Status``, ``Retry-After`` and ``X-Request-ID``.

Routes: ``/`` (and ``/shop``) an HTML page and ``/api/items`` a JSON API, both calling the
catalog; ``/healthz`` a health check that calls nothing and is never shed.
"""

from __future__ import annotations

import argparse
import atexit
import html
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from flask import Flask, current_app

from gateway_guard.flask import GatewayGuard, get_guard

DEFAULT_UPSTREAM_URL = "http://127.0.0.1:9101"
UPSTREAM = "catalog"
# The key under which each app keeps its catalog client in app.extensions.
CLIENT_KEY = "catalog_client"

# The same settings as examples/fastapi_app.py (see there for them as TOML). The breaker's
# thresholds are small so that it visibly opens after a few failed calls.
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
        {"path": "/", "priority": "critical", "depends_on": [UPSTREAM]},
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

# One extension object for every app the factory builds; each app gets its own Guard.
ext = GatewayGuard()


def build_settings(upstream_url: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The example's settings, with ``upstream_url`` and ``overrides`` merged in.

    ``upstream_url`` defaults to ``$UPSTREAM_URL``, then ``http://127.0.0.1:9101``.
    ``overrides`` are top-level settings keys, merged table by table.
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


def create_app(upstream_url: str | None = None, **overrides: Any) -> Flask:
    """Build the example app; see :func:`build_settings` for the arguments."""
    app = Flask(__name__)
    app.config["GATEWAY_GUARD"] = build_settings(upstream_url, **overrides)
    # Invalid settings fail here, at startup, with a SettingsError naming the key.
    ext.init_app(app)

    # One client per app for its lifetime: its connection pool is shared by every request
    # (httpx.Client is thread-safe). Breakers, budgets and bulkheads live in the Guard.
    client = get_guard(app).client(UPSTREAM)
    app.extensions[CLIENT_KEY] = client
    atexit.register(client.close)

    @app.get("/")
    @app.get("/shop", endpoint="shop")
    def index() -> str:
        upstream, elapsed = _call_catalog()
        rows = "".join(
            f"<tr><td>{_e(item['name'])}</td><td>{_e(item['sku'])}</td>"
            f"<td class=num>{_e(item['price'])}</td></tr>"
            for item in ITEMS
        )
        return _page(
            "Shop",
            "<h1>Shop</h1>"
            f"<p>The catalog answered in {elapsed * 1000:.0f} ms "
            f"(its request #{_e(upstream.get('request_number'))}).</p>"
            f"<table><tr><th>Item</th><th>SKU</th><th class=num>Price</th></tr>{rows}</table>"
            '<p><a href="/api/items">The same as JSON</a></p>',
        )

    @app.get("/api/items")
    @ext.policy(retry={"attempts": 2}, deadline=3.0)  # an API client retries by itself
    def items() -> dict[str, Any]:
        upstream, elapsed = _call_catalog()
        return {
            "items": list(ITEMS),
            "catalog": {
                "request_number": upstream.get("request_number"),
                "elapsed_ms": round(elapsed * 1000, 1),
            },
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        # Exempt from load shedding (the default [shed] exempt list), and it calls no
        # upstream: the process is healthy even while the catalog is not.
        return {"status": "ok"}

    return app


def catalog() -> httpx.Client:
    """The current app's guarded client of the catalog upstream."""
    client: httpx.Client = current_app.extensions[CLIENT_KEY]
    return client


def _call_catalog() -> tuple[dict[str, Any], float]:
    # No try/except: when the catalog fails for good (retries spent, breaker open, load
    # shed), the guarded client raises a gateway_guard.UpstreamError and the extension
    # answers with the branded page.
    started = time.perf_counter()
    response = catalog().get("/items")
    elapsed = time.perf_counter() - started
    data = response.json()
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
a {{ color: #0f766e; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .25rem .75rem .25rem 0;
  border-bottom: 1px solid #d1d5db; }}
.num {{ text-align: right; }}
</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The gateway_guard Flask example app.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--upstream-url",
        help=f"the catalog upstream (default: $UPSTREAM_URL or {DEFAULT_UPSTREAM_URL})",
    )
    args = parser.parse_args(argv)
    # Flask's development server; in production use a WSGI server (gunicorn, waitress...).
    create_app(args.upstream_url).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
