"""A Django shop whose catalog service misbehaves on demand, guarded by gateway_guard.

Run it, with the misbehaving upstream it calls in another terminal::

    python examples/upstream.py               # the catalog: data on 9101, control on 9102
    python examples/django_app/app.py         # http://127.0.0.1:8002/

    python examples/demo.py mode refuse       # then reload http://127.0.0.1:8002/
    curl -i -H 'Accept: application/json' http://127.0.0.1:8002/api/items

    UPSTREAM_URL=http://127.0.0.1:9201 python examples/django_app/app.py runserver 127.0.0.1:8003
    python examples/django_app/app.py check   # the system checks, gateway_guard's included
    uvicorn --app-dir examples/django_app app:asgi_application --port 8002   # under ASGI

Needs ``pip install 'gateway-guard[django]'``. A whole Django project in one file
(``settings.configure`` instead of a settings module, this module as the URLconf), to show:

- ``"gateway_guard.django"`` in INSTALLED_APPS (system checks), the middleware near the
  top of MIDDLEWARE, and ``GATEWAY_GUARD`` (a mapping here; a path such as
  ``BASE_DIR / "gateway_guard.toml"`` works the same);
- one guarded ``httpx.Client`` for the ``catalog`` upstream per process, from
  ``get_guard()``, so its connections are reused by every request;
- ``@gateway_policy(...)``: a per-view retry and deadline policy, on an async view;
- no try/except around upstream calls: a failure the guard cannot recover from becomes
  the branded 502/503/504 page (browsers) or problem+json (API clients), with
  ``Proxy-Status``, ``Retry-After`` and ``X-Request-ID``.

Routes: ``/`` an HTML page and ``/api/items`` a JSON API, both calling the catalog;
``/healthz`` a health check that calls nothing and is never shed.
"""

from __future__ import annotations

import atexit
import functools
import html
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.management import execute_from_command_line
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from gateway_guard.django import gateway_policy, get_guard

DEFAULT_UPSTREAM_URL = "http://127.0.0.1:9101"
UPSTREAM = "catalog"
DEFAULT_ARGS = ["runserver", "127.0.0.1:8002", "--noreload"]

# The same settings as examples/flask_app.py and examples/fastapi_app.py. The breaker's
# thresholds are small so that it visibly opens after a few failed calls.
GATEWAY_GUARD: dict[str, Any] = {
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
            "base_url": os.environ.get("UPSTREAM_URL") or DEFAULT_UPSTREAM_URL,
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
        {"path": "/api/{rest:path}", "priority": "sheddable", "depends_on": [UPSTREAM]},
    ],
}

settings.configure(
    DEBUG=False,
    SECRET_KEY="gateway-guard-example-only-not-secret",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["gateway_guard.django"],
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        # Near the top: outside everything that may call an upstream or turn an exception
        # into a response, so it sees every response (X-Request-ID) and every view error.
        "gateway_guard.django.GatewayGuardMiddleware",
        "django.middleware.common.CommonMiddleware",
    ],
    GATEWAY_GUARD=GATEWAY_GUARD,
)

# The upstream is a stand-in that echoes requests, so the items themselves live here.
ITEMS = (
    {"sku": "TEA-01", "name": "Sencha green tea, 100 g", "price": "8.50"},
    {"sku": "MUG-02", "name": "Stoneware mug", "price": "14.00"},
    {"sku": "POT-03", "name": "Cast-iron teapot", "price": "39.00"},
)


@functools.cache
def catalog() -> httpx.Client:
    """The process's guarded client of the catalog (httpx.Client is thread-safe).

    Breakers, budgets and bulkheads live in the Guard; the client brings the connection
    pool. Built on first use, when the settings are loaded.
    """
    client = get_guard().client(UPSTREAM)
    atexit.register(client.close)
    return client


def index(request: HttpRequest) -> HttpResponse:
    # No try/except: when the catalog fails for good (retries spent, breaker open, load
    # shed), the guarded client raises a gateway_guard.UpstreamError and the middleware
    # answers with the branded page.
    started = time.perf_counter()
    upstream = catalog().get("/items").json()
    elapsed = time.perf_counter() - started
    rows = "".join(
        f"<tr><td>{_e(item['name'])}</td><td>{_e(item['sku'])}</td>"
        f"<td class=num>{_e(item['price'])}</td></tr>"
        for item in ITEMS
    )
    return HttpResponse(
        _page(
            "Shop",
            "<h1>Shop</h1>"
            f"<p>The catalog answered in {elapsed * 1000:.0f} ms "
            f"(its request #{_e(upstream.get('request_number'))}).</p>"
            f"<table><tr><th>Item</th><th>SKU</th><th class=num>Price</th></tr>{rows}</table>"
            '<p><a href="/api/items">The same as JSON</a></p>',
        )
    )


@gateway_policy(retry={"attempts": 2}, deadline=3.0)  # an API client retries by itself
async def items(request: HttpRequest) -> JsonResponse:
    # An async view gets its own AsyncClient: one is bound to the event loop it runs on.
    started = time.perf_counter()
    async with get_guard().async_client(UPSTREAM) as client:
        upstream = (await client.get("/items")).json()
    return JsonResponse(
        {
            "items": list(ITEMS),
            "catalog": {
                "request_number": upstream.get("request_number"),
                "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        }
    )


def healthz(request: HttpRequest) -> JsonResponse:
    # Exempt from load shedding (the default [shed] exempt list), and it calls no
    # upstream: the process is healthy even while the catalog is not.
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("", index),
    path("api/items", items),
    path("healthz", healthz),
]


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


# For a real server: ``gunicorn --chdir examples/django_app app:application`` or the
# uvicorn line above. Both set Django up (and load the middleware, building the Guard).
application = get_wsgi_application()
asgi_application = get_asgi_application()


def main(argv: Sequence[str] | None = None) -> None:
    """``manage.py`` for this one-file project; no arguments: serve on 127.0.0.1:8002."""
    args = list(sys.argv[1:] if argv is None else argv) or DEFAULT_ARGS
    # runserver is Django's development server; --noreload keeps it one process.
    execute_from_command_line([sys.argv[0], *args])


if __name__ == "__main__":
    main()
