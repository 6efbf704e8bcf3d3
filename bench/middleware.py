"""What GatewayGuardMiddleware adds to a request, next to what users would otherwise use.

In-process, one run, interleaved rounds (see bench/_common.py): a bare async Starlette
app, the same app with GatewayGuardMiddleware (route match, request id, shedding and
the request context all on), with asgi-correlation-id, and with a no-op
BaseHTTPMiddleware. Goal: <= 3 us added per request. Also the cost of rendering one
error page (goal <= 50 us).

    .venv/bin/python bench/middleware.py [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    async_timer,
    compare,
    goal,
    interleave,
    machine_note,
    markdown_table,
    measure,
    text_table,
)
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import gateway_guard as gg

ADDED_GOAL_US = 3.0
RENDER_GOAL_US = 50.0

SETTINGS: dict[str, Any] = {
    "service": "bench",
    "upstreams": {"payments": {"base_url": "http://payments.test"}},
    "routes": [
        {"path": "/checkout/{rest:path}", "methods": ["POST"], "priority": "critical"},
        {"path": "/orders/{order_id}", "deadline": 5.0},
    ],
    "shed": {"max_concurrent": 200, "max_queue": 400},
}

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/orders/42",
    "raw_path": b"/orders/42",
    "query_string": b"",
    "root_path": "",
    "headers": [
        (b"host", b"shop.test"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"application/json"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
    ],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def order(request: Request) -> Response:
    return PlainTextResponse("ok")


class NoOp(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def make_app(kind: str) -> Starlette:
    app = Starlette(routes=[Route("/orders/{order_id}", order)])
    if kind == "gateway_guard":
        app.add_middleware(gg.GatewayGuardMiddleware, settings=SETTINGS)
    elif kind == "asgi-correlation-id":
        from asgi_correlation_id import CorrelationIdMiddleware

        app.add_middleware(CorrelationIdMiddleware)
    elif kind == "BaseHTTPMiddleware (no-op)":
        app.add_middleware(NoOp)
    return app


def request_fn(app: Starlette) -> Callable[[], Awaitable[None]]:
    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    async def one() -> None:
        # Starlette writes into the scope; every candidate pays for the same fresh copy.
        await app({**SCOPE, "headers": list(SCOPE["headers"])}, receive, send)

    return one


def render_cost(number: int, repeat: int) -> float:
    guard = gg.Guard({**SETTINGS, "brand": {"name": "Bench Shop"}})
    error = gg.UpstreamTimeout("read timed out", proxy_error="connection_read_timeout")
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

    def render() -> object:
        return guard.renderer.render(error, request_id="0123456789abcdef", accept=accept)

    render()
    return sorted(measure(render, number=number, repeat=repeat))[repeat // 2]


def main(quick: bool = False, markdown: bool = False) -> list[dict[str, Any]]:
    kinds = ["bare", "gateway_guard", "asgi-correlation-id", "BaseHTTPMiddleware (no-op)"]
    number, rounds = (500, 5) if quick else (2000, 61)
    with asyncio.Runner() as runner:
        timers = {k: async_timer(request_fn(make_app(k)), runner) for k in kinds}
        result = interleave(timers, number=number, rounds=rounds, warmup=number, budget=120)
    table = compare(result.samples, "bare")
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        c = table[kind]
        rows.append(
            {
                "candidate": kind,
                "median_us": round(c.median_us, 2),
                "added_us": round(c.added_us, 2),
                "added_ci": f"{c.added_ci[0]:.2f}-{c.added_ci[1]:.2f}",
                "ratio": round(c.ratio_median, 3),
            }
        )
    render_us = render_cost(2000 if quick else 20000, 5 if quick else 9)
    headers = ["candidate", "median µs/request", "added µs (median)", "added 95% CI", "ratio"]
    cells = [
        [r["candidate"], r["median_us"], r["added_us"], r["added_ci"], r["ratio"]] for r in rows
    ]
    print(
        f"middleware overhead, {result.rounds} interleaved rounds of {number} requests (CPU time)"
    )
    print(machine_note())
    print((markdown_table if markdown else text_table)(headers, cells))
    print(f"render one cached HTML error page: {render_us:.2f} µs")
    added = table["gateway_guard"].added_us
    met = goal("gateway_guard added per request", added, ADDED_GOAL_US, unit=" µs")
    render_met = goal("render one error page", render_us, RENDER_GOAL_US, unit=" µs")
    rows.append({"candidate": "render error page", "median_us": round(render_us, 2)})
    for row in rows:
        row["goal_met"] = met if row["candidate"] == "gateway_guard" else None
    rows[-1]["goal_met"] = render_met
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~10 s smoke run")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    main(quick=args.quick, markdown=args.markdown)
