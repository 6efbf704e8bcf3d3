"""What GatewayGuardMiddleware adds to a request, next to what users would otherwise use.

In-process, one run, interleaved rounds (see bench/_common.py): a bare async Starlette
app, the same app with GatewayGuardMiddleware (route match, request id, shedding and
the request context all on), with asgi-correlation-id, and with a no-op
BaseHTTPMiddleware. Goal: <= 3 us added per request. Also the cost of rendering one
error page (goal <= 50 us).

``--instructions`` is the quick form of that view: instructions a request only (valgrind
without the cache simulation, about half the time), what the hot-path comments quote.

``--cachegrind`` adds a view that does not depend on the machine's load: the bare app and
the guarded one each serve the same requests under valgrind's cache and branch
simulation, and the table gives per request the instructions, misses, mispredictions and
a simulated cost in cycles (see ``simulated_cycles`` in bench/_common.py). It is how the
middleware's pieces were priced: change one thing, run it again, compare (a minute or
two, the runs in parallel; the timed rounds are skipped with ``--cachegrind-only``).

    .venv/bin/python bench/middleware.py [--quick] [--markdown] [--cachegrind[-only]]
    .venv/bin/python bench/middleware.py --instructions
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Comparison,
    async_timer,
    compare,
    count_instructions,
    goal,
    interleave,
    machine_note,
    markdown_table,
    measure,
    simulate_caches,
    simulated_cycles,
    text_table,
    valgrind,
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
    elif kind in VARIANTS:
        guard = gg.Guard({**SETTINGS, **VARIANTS[kind]})
        if kind == "+ a hook":
            guard.on(gg.events.CallEnded, lambda event: None)
        elif kind == "+ asgi-correlation-id loaded":
            import asgi_correlation_id  # noqa: F401 - imported, not used in this app
        app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)
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


# --- simulated caches (--cachegrind) ---------------------------------------------------------

CACHEGRIND_KINDS = ("bare", "gateway_guard")
# Two request counts: their difference cancels start-up, imports and app construction.
CACHEGRIND_REQUESTS = (1000, 3000)


def child(kind: str, requests: int) -> None:
    """Serve ``requests`` requests with one candidate and nothing else (run under valgrind)."""
    one = request_fn(make_app(kind))

    async def many() -> None:
        for _ in range(requests):
            await one()

    with asyncio.Runner() as runner:
        runner.run(many())


def _argv(kind: str, requests: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", kind, str(requests)]


def run_cachegrind() -> list[dict[str, Any]]:
    """Per request: instructions, misses, mispredictions and simulated cycles, each
    ``(count at n2 requests - count at n1) / (n2 - n1)``."""
    # Once outside valgrind first, so that no counted run pays for compiling .pyc files.
    subprocess.run(_argv("gateway_guard", 1), check=True, capture_output=True)
    n1, n2 = CACHEGRIND_REQUESTS
    jobs = [(kind, n) for kind in CACHEGRIND_KINDS for n in (n1, n2)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = pool.map(lambda job: simulate_caches(_argv(*job)), jobs)
        counted = dict(zip(jobs, counts, strict=True))
    rows: list[dict[str, Any]] = []
    for kind in CACHEGRIND_KINDS:
        low, high = counted[(kind, n1)], counted[(kind, n2)]
        per = {key: (high[key] - low[key]) / (n2 - n1) for key in high}
        rows.append({"candidate": kind, **per, "cycles": simulated_cycles(per)})
    bare = rows[0]["cycles"]
    for row in rows:
        row["ratio"] = row["cycles"] / bare
    return rows


# gateway_guard in other settings, for --instructions: what the status page's and the health
# check's paths cost every other request, an event hook that hears none of the inbound
# events, and an id library imported by the process but not used by this app.
VARIANTS: dict[str, dict[str, Any]] = {
    "+ status, health": {"status": {"path": "/_status"}, "health": {"path": "/healthz"}},
    "+ a hook": {},
    "+ asgi-correlation-id loaded": {},
}


def run_instructions() -> dict[str, float]:
    """Instructions a request for each of :data:`CACHEGRIND_KINDS` and :data:`VARIANTS`,
    counted as :func:`run_cachegrind` counts them, without the cache simulation."""
    subprocess.run(_argv("gateway_guard", 1), check=True, capture_output=True)
    n1, n2 = CACHEGRIND_REQUESTS
    kinds = [*CACHEGRIND_KINDS, *VARIANTS]
    jobs = [(kind, n) for kind in kinds for n in (n1, n2)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = pool.map(lambda job: count_instructions(_argv(*job)), jobs)
        counted = dict(zip(jobs, counts, strict=True))
    return {kind: (counted[(kind, n2)] - counted[(kind, n1)]) / (n2 - n1) for kind in kinds}


def format_cachegrind(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    headers = [
        "candidate",
        "instructions",
        "I1 misses",
        "D1 misses",
        "LL misses",
        "mispredicts",
        "simulated cycles",
        "ratio",
    ]
    cells = [
        [
            r["candidate"],
            f"{r['instructions']:,.0f}",
            f"{r['i1_misses']:,.0f}",
            f"{r['d1_misses']:,.0f}",
            f"{round(r['lli_misses'] + r['lld_misses']) or 0:,}",  # no '-0' from noise
            f"{r['mispredicts']:,.0f}",
            f"{r['cycles']:,.0f}",
            f"{r['ratio']:.3f}",
        ]
        for r in rows
    ]
    n1, n2 = CACHEGRIND_REQUESTS
    return "\n".join(
        [
            f"per request, valgrind cachegrind (count at {n2} - count at {n1}) / {n2 - n1}",
            (markdown_table if markdown else text_table)(headers, cells),
        ]
    )


def main(
    quick: bool = False, markdown: bool = False, *, cachegrind: bool = False, timed: bool = True
) -> list[dict[str, Any]]:
    rows = timed_rows(quick, markdown) if timed else []
    if cachegrind:
        if valgrind() is None:
            print("--cachegrind: valgrind is not installed; skipped")
        else:
            print(format_cachegrind(run_cachegrind(), markdown=markdown))
    return rows


def timed_rows(quick: bool, markdown: bool) -> list[dict[str, Any]]:
    kinds = ["bare", "gateway_guard", "asgi-correlation-id", "BaseHTTPMiddleware (no-op)"]
    number, rounds = (500, 5) if quick else (2000, 61)
    # Two groups, each with its own bare app: asgi-correlation-id is imported only after
    # gateway_guard's rounds. Loaded, it makes GatewayGuardMiddleware look for its id on
    # every request (inbound/_ids.py) and, its context variable never being reset in this
    # one task, take the last request's id for an outer middleware's: a process that
    # runs gateway_guard alone (the cachegrind view's, a server's) does neither.
    groups = [[k for k in kinds if k != "asgi-correlation-id"], ["bare", "asgi-correlation-id"]]
    table: dict[str, Comparison] = {}
    done = 0
    with asyncio.Runner() as runner:
        for group, budget in zip(groups, (80, 40), strict=True):
            timers = {k: async_timer(request_fn(make_app(k)), runner) for k in group}
            result = interleave(timers, number=number, rounds=rounds, warmup=number, budget=budget)
            done = done or result.rounds
            table = {**compare(result.samples, "bare"), **table}
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
        f"middleware overhead, {done} interleaved rounds of {number} requests (CPU time); "
        "asgi-correlation-id in rounds of its own, against its own bare app"
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
    parser.add_argument(
        "--cachegrind", action="store_true", help="also simulate caches (valgrind, ~2 min)"
    )
    parser.add_argument(
        "--cachegrind-only", action="store_true", help="only the simulated-cache view"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="only instructions a request (valgrind)"
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.instructions:
        counts = run_instructions()
        n1, n2 = CACHEGRIND_REQUESTS
        print(f"instructions a request, valgrind (count at {n2} - count at {n1}) / {n2 - n1}")
        for kind, count in counts.items():
            added = "" if kind == "bare" else f"{count - counts['bare']:+12,.0f} added"
            print(f"{kind:30} {count:10,.0f} {added}")
    else:
        main(
            quick=args.quick,
            markdown=args.markdown,
            cachegrind=args.cachegrind or args.cachegrind_only,
            timed=not args.cachegrind_only,
        )
