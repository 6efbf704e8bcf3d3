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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.management import execute_from_command_line
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from gateway_guard.django import gateway_policy, get_guard

# examples/shop.py holds what the three examples share (settings, items, HTML). This file
# is one folder down: run as a script (or by gunicorn and uvicorn as below), only its own
# folder, examples/django_app/, is on sys.path. Put examples/ there too to import shop.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shop
from shop import UPSTREAM, items_json, items_page

DEFAULT_ARGS = ["runserver", "127.0.0.1:8002", "--noreload"]

# The demo shop's settings (shop.settings shows them as a settings file would read them).
# "/" is the HTML page that calls the catalog: with /api/..., while the catalog's breaker
# is open, it answers 503 at once.
GATEWAY_GUARD = shop.settings(["/"])

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
    return HttpResponse(items_page(upstream, elapsed, ("/api/items", "The same as JSON")))


@gateway_policy(retry={"attempts": 2}, deadline=3.0)  # an API client retries by itself
async def items(request: HttpRequest) -> JsonResponse:
    # An async view gets its own AsyncClient: one is bound to the event loop it runs on.
    started = time.perf_counter()
    async with get_guard().async_client(UPSTREAM) as client:
        upstream = (await client.get("/items")).json()
    return JsonResponse(items_json(upstream, time.perf_counter() - started))


def healthz(request: HttpRequest) -> JsonResponse:
    # Exempt from load shedding (the default [shed] exempt list), and it calls no
    # upstream: the process is healthy even while the catalog is not.
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("", index),
    path("api/items", items),
    path("healthz", healthz),
]


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
