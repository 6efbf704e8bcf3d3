"""Per-call cost of a guarded httpx call with Prometheus metrics and OpenTelemetry tracing
on, against bare httpx and against the guard with both off, sync and async.

    .venv/bin/python bench/observability.py [--quick] [--markdown] [--clock wall]
        [--instructions]

Goal (issue 14): guarded httpx with Prometheus and OpenTelemetry both on costs at most
1.06x bare httpx per call. With both off, the existing goals stand (bench/transport.py).

Every candidate makes bench/transport.py's call: ``GET /items/42`` through
``httpx.MockTransport`` (no network), one client per candidate, built once.

- bare httpx: the baseline.
- gateway_guard: the defaults, metrics and tracing off (what bench/transport.py judges).
- gateway_guard + metrics + tracing: ``[metrics] enabled`` and ``[tracing] enabled``,
  with opentelemetry-api alone (no SDK configured: the tracer and meter are the API's
  no-op ones). The goal is judged here: it is the package's own cost, whatever the SDK.
- gateway_guard + metrics + tracing (SDK): the same with an SDK TracerProvider that
  samples every span into a span processor that drops them, and an SDK MeterProvider.
  For reference: what a traced app pays is mostly the SDK's span bookkeeping.

Method: bench/_common.py's interleaved rounds, as bench/transport.py. ``--quick`` runs
about 10 s; the default about a minute. ``--instructions`` adds instructions per sync
client call under valgrind (noise-free; no SDK), for before/after comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

# As a script (`python bench/observability.py`) only bench/ is on sys.path: put the
# repository there too, so bench.transport's helpers import the same way as under run_all.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import count_instructions, goal, markdown_table, text_table, valgrind
from bench.transport import (
    BASE_URL,
    FULL,
    PATH,
    QUICK,
    Candidate,
    _mock,
    _rows,
    _run_async,
    _run_sync,
)

import gateway_guard as gg

GOAL_RATIO = 1.06
BASELINE = "bare httpx"
OFF = "gateway_guard"
ON = "gateway_guard + metrics + tracing"
ON_SDK = "gateway_guard + metrics + tracing (SDK)"


def _guard(on: bool) -> gg.Guard:
    settings: dict[str, Any] = {"upstreams": {"up": {"base_url": BASE_URL}}}
    if on:
        settings["metrics"] = {"enabled": True}
        settings["tracing"] = {"enabled": True}
    return gg.Guard(settings)


def _sdk_tracer() -> Callable[[], None]:
    """Install an SDK whose spans are sampled, recorded and dropped; returns an undo."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Drop(SpanProcessor):
        pass

    provider = TracerProvider()
    provider.add_span_processor(Drop())
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _sync(stack: ExitStack) -> list[Candidate]:
    bare = stack.enter_context(httpx.Client(transport=_mock(), base_url=BASE_URL))
    off = stack.enter_context(_guard(False).client("up", transport=_mock()))
    on = stack.enter_context(_guard(True).client("up", transport=_mock()))
    return [
        Candidate(BASELINE, "httpx", lambda: bare.get(PATH)),
        Candidate(OFF, "gateway-guard", lambda: off.get(PATH)),
        Candidate(ON, "gateway-guard", lambda: on.get(PATH)),
    ]


def _async(clients: list[httpx.AsyncClient]) -> list[Candidate]:
    bare = httpx.AsyncClient(transport=_mock(), base_url=BASE_URL)
    off = _guard(False).async_client("up", transport=_mock())
    on = _guard(True).async_client("up", transport=_mock())
    clients += [bare, off, on]
    return [
        Candidate(BASELINE, "httpx", lambda: bare.get(PATH)),
        Candidate(OFF, "gateway-guard", lambda: off.get(PATH)),
        Candidate(ON, "gateway-guard", lambda: on.get(PATH)),
    ]


def _judge(rows: list[dict[str, Any]], name: str, judged: bool) -> list[dict[str, Any]]:
    for row in rows:
        row["bench"] = "observability"
        is_goal = judged and row["candidate"] == name
        row["goal_ratio"] = GOAL_RATIO if is_goal else None
        row["goal_met"] = (row["ratio"] <= GOAL_RATIO) if is_goal else None
    return rows


def main(
    quick: bool = False, *, markdown: bool = False, clock: str = "cpu"
) -> list[dict[str, Any]]:
    plan = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        candidates = _sync(stack)
        rounds = _run_sync(candidates, plan, "client", clock)
        rows += _judge(_rows("client", "sync", candidates, rounds, clock), ON, True)
    clients: list[httpx.AsyncClient] = []
    with asyncio.Runner() as runner:
        try:
            candidates = _async(clients)
            rounds = _run_async(candidates, plan, "client", clock, runner)
            rows += _judge(_rows("client", "async", candidates, rounds, clock), ON, True)
        finally:
            for client in clients:
                runner.run(client.aclose())
    # Last: an SDK, once installed, is the process's for good.
    undo = _sdk_tracer()
    try:
        with ExitStack() as stack:
            candidates = _sync(stack)
            candidates[2].name = ON_SDK
            rounds = _run_sync(candidates, plan, "client", clock)
            sdk_rows = _rows("client", "sync", candidates, rounds, clock)
            rows += _judge([r for r in sdk_rows if r["candidate"] == ON_SDK], ON_SDK, False)
    finally:
        undo()
    _print(rows, markdown)
    return rows


def _print(rows: list[dict[str, Any]], markdown: bool) -> None:
    table = [
        [
            r["mode"],
            r["candidate"],
            f"{r['us_per_call']:.2f}",
            f"{r['ratio']:.3f}x",
            f"{r['ratio_ci'][0]:.3f}-{r['ratio_ci'][1]:.3f}x",
            f"{r['added_us']:+.2f}",
            f"≤ {r['goal_ratio']}x" if r["goal_ratio"] else "",
        ]
        for r in rows
    ]
    headers = ["mode", "candidate", "µs/call", "ratio", "95% CI", "+µs/call", "goal"]
    if markdown:
        print(markdown_table(headers, table))
    else:
        print(text_table(headers, table))
    print()
    for r in rows:
        if r["goal_ratio"]:
            goal(f"{r['mode']}: {ON} / bare httpx", r["ratio"], GOAL_RATIO)


def child(name: str, calls: int) -> None:
    """Make ``calls`` sync client calls of one candidate (run under valgrind)."""
    with ExitStack() as stack:
        candidate = next(c for c in _sync(stack) if c.name == name)
        for _ in range(calls):
            candidate.call()


def instructions(calls: tuple[int, int] = (50, 250)) -> dict[str, float]:
    """Instructions per sync client call: (count(n2) - count(n1)) / (n2 - n1)."""
    names = (BASELINE, OFF, ON)
    script = os.path.abspath(__file__)
    jobs = [(name, n) for name in names for n in calls]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = list(
            pool.map(
                lambda job: count_instructions(
                    [sys.executable, script, "--child", job[0], str(job[1])]
                ),
                jobs,
            )
        )
    by = dict(zip(jobs, counts, strict=True))
    n1, n2 = calls
    per = {name: (by[(name, n2)] - by[(name, n1)]) / (n2 - n1) for name in names}
    base = per[BASELINE]
    for name in names:
        print(f"{name:40} {per[name]:>12,.0f} instr/call  {per[name] / base:.4f}x")
    return per


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--instructions", action="store_true", help="valgrind counts only")
    parser.add_argument("--child", nargs=2, metavar=("CANDIDATE", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.instructions:
        if valgrind() is None:
            sys.exit("--instructions: valgrind is not installed")
        instructions()
    else:
        main(args.quick, markdown=args.markdown, clock=args.clock)
