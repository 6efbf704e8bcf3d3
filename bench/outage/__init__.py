"""Outage scenarios: real servers, a real misbehaving upstream, bounded load, three app variants.

    .venv/bin/python -m bench.outage [--quick] [--markdown]
    .venv/bin/python bench/outage/__init__.py [--quick] [--markdown]

``main(quick=False) -> list[dict]`` returns one dict per figure::

    {"scenario": "1 upstream hangs (async)", "variant": "gateway_guard",
     "metric": "dep p99 ms", "value": 0.9, "goal": "≤ 10 ms", "met": True}

``variant`` is ``plain``, ``tenacity+pybreaker``, ``gateway_guard`` or ``no outage``; a
figure without a goal has ``goal`` and ``met`` None. Goals are judged on the
gateway_guard rows only; the other variants are the reference.

Scenarios (each on 127.0.0.1: the project's MisbehavingUpstream in its own process, the
app variant under a real server in another, this process generating bounded load with a
raw asyncio HTTP/1.1 client; the variants are described in apps.py):

1. upstream hangs, async (uvicorn, 1 worker) and threaded (cheroot, 8 threads):
   ``/dep`` at 100 requests/s (open loop) all along; once in steady state (for a breaker,
   when it opened plus the read timeout, so calls admitted before it opened are gone),
   one whole breaker cycle is measured: /dep latencies, and ``/healthy`` throughput and
   p99 under 8 closed-loop clients, against a *twin* of the app (same variant and
   settings, its own process, a healthy upstream, the same /dep load) in alternating
   0.3 s windows. The twin's figures are the "no outage" rows; a ratio is the median over
   window pairs of app / twin, so the machine's noise hits both sides alike.
2. upstream refuses connections: the same, plus outbound attempts per inbound request
   (counted in the app: a refused connection never reaches the upstream's /stats).
3. upstream answers 503 to 100% of requests, then (after recovering) to 10%, 30% and 50%
   of them at random, one phase after the other (async): upstream calls per inbound
   request (the upstream's /stats over the app's inbound count), the success rate clients
   see, and how often gateway_guard's breaker opened; a partly failing upstream must never
   do worse through the guard than through plain httpx. Full runs add tenacity alone and
   gateway_guard without a breaker (default budget_ratio, and 0.2) at 100%: the retry
   budget on its own.
4. overload (async): capacity = /dep throughput with 8 concurrent clients against a
   20 ms upstream (the httpx-based app's throughput falls above ~16 concurrent calls,
   with or without gateway_guard); then 3x that rate offered open loop: goodput, served
   p99, and how fast shed 503s are answered at the client and in the server (x-bench-us:
   app entry to response start). gateway_guard sheds at 8 in flight, queue 4, 25 ms
   queue timeout; full runs add a fail-fast variant (no queue).
5. recovery (async): at the end of scenarios 2 and 3 the upstream comes back (ok); the
   time until the clients' success rate is >= 99% in every later 1 s window (requests
   placed by send time), with the breaker's open time left at the switch.

Durations on the 2-CPU machine: about 5 minutes (scenario 1: ~2 min); ``--quick``: under
a minute (read timeout and open_seconds 0.5 s, fewer and shorter windows, no hand-built
variant, no extra runs) - a smoke test, not figures to quote. Every load loop is bounded
in count and time, every process is stopped on the way out (errors, Ctrl-C and SIGTERM
included; on Linux the servers also die with this process). ``--only N`` runs one
scenario. Every duration and rate is in scenarios.py (FULL, QUICK).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(_ROOT))

from bench._common import machine_note, markdown_table, text_table  # noqa: E402
from bench.outage.scenarios import FULL, QUICK, run_all  # noqa: E402

__all__ = ["format_tables", "main", "verdicts"]


def _value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_tables(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """One table per scenario (variant, metric, value, goal, verdict)."""
    table = markdown_table if markdown else text_table
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        scenarios.setdefault(r["scenario"], []).append(r)
    out = []
    for scenario, scenario_rows in scenarios.items():
        cells = [
            [
                r["variant"],
                r["metric"],
                _value(r["value"]),
                r["goal"] or "",
                "" if r["met"] is None else ("met" if r["met"] else "NOT met"),
            ]
            for r in scenario_rows
        ]
        heading = f"### {scenario}" if markdown else f"== {scenario}"
        headers = ["variant", "metric", "value", "goal", "verdict"]
        out.append(heading + "\n\n" + table(headers, cells, align="<<>"))
    return "\n\n".join(out)


def verdicts(rows: list[dict[str, Any]]) -> str:
    """One line per figure that has a goal."""
    return "\n".join(
        f"goal {r['scenario']} / {r['variant']} / {r['metric']}: {_value(r['value'])} "
        f"{r['goal']}: {'met' if r['met'] else 'NOT met'}"
        for r in rows
        if r["goal"] is not None
    )


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(
    quick: bool = False,
    *,
    markdown: bool = False,
    quiet: bool = False,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every scenario; print the tables and verdicts (unless ``quiet``); return the rows."""

    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    # SIGTERM would end the process without running `finally`: turn it into SystemExit
    # so every server this run started is stopped (restored afterwards).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        rows = run_all(quick, log, only)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not quiet:
        t = QUICK if quick else FULL
        print(machine_note())
        print(
            f"read timeout {t.read_timeout:g} s, connect {t.connect_timeout:g} s, "
            f"open_seconds {t.open_seconds:g} s; /dep {t.dep_rate:g}/s open loop; "
            f"/healthy {t.healthy_workers} closed-loop clients in app/twin windows of "
            f"{t.side:g} s; 503 phases {t.status_phase:g} s; overload windows "
            f"{t.windows} x {t.window:g} s; total {time.monotonic() - started:.0f} s\n"
        )
        print(format_tables(rows, markdown=markdown))
        print()
        print(verdicts(rows))
    return rows


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.outage", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the smoke-test run (< 60 s)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument(
        "--only",
        action="append",
        choices=["1", "2", "3", "4"],
        help="run only this scenario (repeatable; 5 is measured within 2 and 3)",
    )
    args = parser.parse_args(argv)
    main(args.quick, markdown=args.markdown, only=args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
