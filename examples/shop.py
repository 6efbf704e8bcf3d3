"""The demo shop that the three examples share: its settings, items, HTML and command line.

``fastapi_app.py``, ``flask_app.py`` and ``django_app/app.py`` are one small shop in three
frameworks. What does not depend on the framework lives here, so that each example shows
only its own framework's code. Not an app: there is nothing here to run.
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_UPSTREAM_URL = "http://127.0.0.1:9101"
UPSTREAM = "catalog"

# The upstream is a stand-in that echoes requests, so the items themselves live here.
ITEMS = (
    {"sku": "TEA-01", "name": "Sencha green tea, 100 g", "price": "8.50"},
    {"sku": "MUG-02", "name": "Stoneware mug", "price": "14.00"},
    {"sku": "POT-03", "name": "Cast-iron teapot", "price": "39.00"},
)


def settings(
    pages: Sequence[str], upstream_url: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """The shop's gateway_guard settings, as a mapping (a new one on every call).

    ``pages`` are the app's HTML pages that call the catalog; with ``/api/...`` they are
    the ``[[routes]]`` that depend on it, so while its breaker is open they answer 503 at
    once, without calling it. ``upstream_url`` defaults to ``$UPSTREAM_URL``, then
    ``http://127.0.0.1:9101``. ``overrides`` are top-level settings keys, merged table by
    table, e.g. ``upstreams={"catalog": {"read_timeout": 0.3}}`` changes only that timeout.

    The same thing as a settings file would read, for ``pages=["/shop"]``::

        service = "demo-shop"
        [brand]
        name = "Acme Demo Shop"
        accent_color = "#0f766e"
        status_url = "https://status.example.com"
        support_url = "https://example.com/support"

        [defaults]
        connect_timeout = 1.0

        [upstreams.catalog]
        base_url = "http://127.0.0.1:9101"
        read_timeout = 2.0
        deadline = 5.0
        retry = { attempts = 3, backoff_initial = 0.1, backoff_max = 0.5 }
        breaker = { window_size = 10, min_calls = 5, failure_rate = 0.5, open_seconds = 10.0 }

        [shed]
        max_concurrent = 50
        max_queue = 100
        queue_timeout = 1.0

        [[routes]]
        path = "/shop"
        priority = "critical"
        depends_on = ["catalog"]

        [[routes]]
        path = "/api/{rest:path}"
        priority = "sheddable"
        depends_on = ["catalog"]

    and with that file, ``guard = gg.Guard("gateway_guard.toml")``. Either way, operators
    can still change one key from the environment: GATEWAY_GUARD__SHED__MAX_CONCURRENT=20.
    The breaker's thresholds are small so that it visibly opens after a few failed calls.
    """
    url = upstream_url or os.environ.get("UPSTREAM_URL") or DEFAULT_UPSTREAM_URL
    routes = [{"path": path, "priority": "critical", "depends_on": [UPSTREAM]} for path in pages]
    routes.append({"path": "/api/{rest:path}", "priority": "sheddable", "depends_on": [UPSTREAM]})
    base = {
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
                "base_url": url,
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
        "routes": routes,
    }
    return _merge(base, overrides)


def arguments(framework: str, port: int, argv: Sequence[str] | None) -> argparse.Namespace:
    """An example app's command line: ``--host``, ``--port`` and ``--upstream-url``."""
    parser = argparse.ArgumentParser(description=f"The gateway_guard {framework} example app.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--upstream-url",
        help=f"the catalog upstream (default: $UPSTREAM_URL or {DEFAULT_UPSTREAM_URL})",
    )
    return parser.parse_args(argv)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


def esc(value: object) -> str:
    """``value`` as HTML text: everything interpolated into HTML goes through here."""
    return html.escape(str(value))


def items_json(upstream: Mapping[str, Any], elapsed: float) -> dict[str, Any]:
    """The shop's JSON API answer: the items, and how the catalog answered.

    ``upstream`` is the catalog's answer and ``elapsed`` how long it took (in seconds).
    """
    return {
        "items": list(ITEMS),
        "catalog": {
            "request_number": upstream.get("request_number"),
            "elapsed_ms": round(elapsed * 1000, 1),
        },
    }


def items_page(upstream: Mapping[str, Any], elapsed: float, link: tuple[str, str]) -> str:
    """The shop's page: the items, and how the catalog answered.

    ``upstream`` is the catalog's answer, ``elapsed`` how long it took (in seconds) and
    ``link`` the ``(href, text)`` of the link under the table.
    """
    rows = "".join(
        f"<tr><td>{esc(item['name'])}</td><td>{esc(item['sku'])}</td>"
        f"<td class=num>{esc(item['price'])}</td></tr>"
        for item in ITEMS
    )
    href, text = link
    body = (
        "<h1>Shop</h1>"
        f"<p>The catalog answered in {elapsed * 1000:.0f} ms "
        f"(its request #{esc(upstream.get('request_number'))}).</p>"
        f"<table><tr><th>Item</th><th>SKU</th><th class=num>Price</th></tr>{rows}</table>"
        f'<p><a href="{esc(href)}">{esc(text)}</a></p>'
    )
    return page("Shop", body)


def page(title: str, body: str) -> str:
    """A whole HTML page around ``body`` (HTML, escaped already)."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · Acme Demo Shop</title>
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
