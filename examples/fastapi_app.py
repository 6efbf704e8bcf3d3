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

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse

import gateway_guard as gg

# examples/shop.py holds what the examples share (settings, items, HTML, command line).
# Run as a script, this file's folder is first on sys.path already; loaded some other
# way (by path, as the tests do), it is not: put it there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shop import (
    DEFAULT_UPSTREAM_URL,
    UPSTREAM,
    arguments,
    esc,
    items_json,
    items_page,
    page,
    settings,
)

# Only shown on the landing page, in the commands that switch the upstream's mode.
DEFAULT_CONTROL_URL = "http://127.0.0.1:9102"

# The HTML pages that call the catalog, for the settings' [[routes]] (with /api/...):
# while its breaker is open they answer 503 at once. Not the landing page "/": it calls
# no upstream, and shows the breaker's state whatever that is.
PAGES = ("/shop",)

MODES = (
    ("ok", "answers at once", "200"),
    ("slow", "answers after delay_ms (over the 2 s read timeout: a timeout)", "200 or 504"),
    ("hang", "never answers", "504 (see hang_answer)"),
    ("refuse", "is down: connections are refused", "502 connection_refused"),
    ("reset", "resets the connection", "502 connection_terminated"),
    ("garbage", "answers bytes that are not HTTP", "502 http_protocol_error"),
    ("truncated", "stops in the middle of its answer", "502 http_response_incomplete"),
    ("status", "answers a status (503 by default)", "502 received-status=503"),
    ("flaky", "fails failure_percent % of requests", "200 (retried) or 502"),
)


def build_settings(upstream_url: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The example's settings, with ``upstream_url`` and ``overrides`` merged in.

    See :func:`shop.settings` for the arguments, and for the settings as a settings file
    would read them: ``guard = gg.Guard("gateway_guard.toml")`` would do the same.
    """
    return settings(PAGES, upstream_url, **overrides)


# The settings with the default upstream, as a mapping (to read or print).
SETTINGS = build_settings(DEFAULT_UPSTREAM_URL)


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
        return HTMLResponse(items_page(upstream, elapsed, ("/", "Back to the demo")))

    @app.get("/api/items")
    async def items(catalog: Catalog) -> dict[str, Any]:
        upstream, elapsed = await _call_catalog(catalog)
        return items_json(upstream, elapsed)

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


def breaker_rule(guard: gg.Guard) -> str:
    """The catalog breaker's rule in words, from the policy it runs with: the page cannot
    promise one rule while the settings apply another."""
    b = guard.policy(UPSTREAM).breaker
    if not b.enabled:
        return "It is turned off here: it never opens."
    unit = "calls" if b.window == "count" else "seconds"
    rule = (
        f"It opens when at least {b.failure_rate:.0%} of the calls in the last "
        f"{b.window_size} {unit} failed, once at least {b.min_calls} calls were made. A call "
        "is judged after its retries, so one failed visit counts once"
    )
    if b.consecutive_timeouts:
        rule += (
            f"; and at once after {b.consecutive_timeouts} timed-out attempts in a row "
            "(a hung catalog)"
        )
    return (
        f"{rule}. Then <code>/shop</code> and <code>/api/items</code> answer 503 at once, "
        f"without calling the catalog, for {b.open_seconds:g} seconds, and "
        f"{b.half_open_calls} probe calls decide whether it closes again."
    )


def hang_answer(guard: gg.Guard) -> str:
    """What a visitor gets from a hung catalog: the deadline ends the call first when the
    attempts' read timeouts add up to it."""
    policy = guard.policy(UPSTREAM)
    if policy.retry.attempts * policy.read_timeout >= policy.deadline:
        return "504 http_response_timeout (the call's deadline)"
    return "504 connection_read_timeout"


def _landing_page(control_url: str) -> str:
    # current_guard() reaches the Guard serving this request from anywhere in it, without
    # passing it around (LookupError outside a request).
    guard = gg.current_guard()
    breaker = guard.breaker(UPSTREAM)
    state = breaker.state.value
    retry_after = breaker.retry_after()
    if retry_after is not None:
        state += f" (half-open in {retry_after:.0f} s)"
    modes = "".join(
        f"<tr><td><code>{esc(name)}</code></td><td>{esc(does)}</td>"
        f"<td>{esc(hang_answer(guard) if name == 'hang' else sees)}</td></tr>"
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
<p>The catalog's breaker is <span class="state">{esc(state)}</span>. Reload this page to
see it change. {breaker_rule(guard)}</p>

<h2>Upstream modes</h2>
<table><tr><th>mode</th><th>the catalog…</th><th>visitors get</th></tr>{modes}</table>

<h2>Switch modes</h2>
<pre>python examples/demo.py mode hang{esc(flags)}
python examples/demo.py mode status --status 503 --retry-after 5{esc(flags)}
python examples/demo.py mode ok{esc(flags)}</pre>
<p>or with curl, against the upstream's control port:</p>
<pre>{esc(curl)}</pre>
<p>Health check: <a href="/healthz">/healthz</a> (never shed, calls no upstream).</p>
"""
    return page("Demo", body)


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
    args = arguments("FastAPI", 8000, argv)
    _console_logging()
    uvicorn.run(create_app(args.upstream_url), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
