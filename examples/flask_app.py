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

import atexit
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from flask import Flask, current_app

from gateway_guard.flask import GatewayGuard, get_guard

# examples/shop.py holds what the examples share (settings, items, HTML, command line).
# Run as a script, this file's folder is first on sys.path already; loaded some other
# way (by path, as the tests do), it is not: put it there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shop import UPSTREAM, arguments, items_json, items_page, settings

# The key under which each app keeps its catalog client in app.extensions.
CLIENT_KEY = "catalog_client"

# The HTML pages that call the catalog, for the settings' [[routes]] (with /api/...):
# while its breaker is open they answer 503 at once.
PAGES = ("/", "/shop")

# One extension object for every app the factory builds; each app gets its own Guard.
ext = GatewayGuard()


def create_app(upstream_url: str | None = None, **overrides: Any) -> Flask:
    """Build the example app; see :func:`shop.settings` for the arguments."""
    app = Flask(__name__)
    app.config["GATEWAY_GUARD"] = settings(PAGES, upstream_url, **overrides)
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
        return items_page(upstream, elapsed, ("/api/items", "The same as JSON"))

    @app.get("/api/items")
    @ext.policy(retry={"attempts": 2}, deadline=3.0)  # an API client retries by itself
    def items() -> dict[str, Any]:
        upstream, elapsed = _call_catalog()
        return items_json(upstream, elapsed)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments("Flask", 8001, argv)
    # Flask's development server; in production use a WSGI server (gunicorn, waitress...).
    create_app(args.upstream_url).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
