"""What zero-code instrumentation (``gg.instrument``) adds to an httpx call.

    .venv/bin/python bench/instrument.py [--quick] [--instructions]

Goals (issue #12):

- a call to a host that is **not** an upstream: instrumentation adds at most 0.5 µs;
- a call to an upstream's host: within 1% of the same call through an explicit
  ``guard.client()`` (the instrumentation's own cost on top of the guard's).

Every candidate makes ``GET /items/42`` through ``httpx.MockTransport`` (no network), from
its own ``httpx.Client``:

- ``bare, other host``: a plain client calling ``http://other.example``, not instrumented;
- ``instrumented, other host``: the same, with ``gg.instrument(guard)`` on;
- ``explicit guard.client()``: ``guard.client("up", transport=mock)``, not instrumented;
- ``instrumented, upstream host``: a plain client calling the upstream's ``base_url``
  host, guarded by the instrumentation.

Instrumentation is process-wide, so each timer switches it on or off (untimed) before its
calls; the rounds interleave as in the other scripts (``bench/_common.py``), each pair
compared within a round. ``--instructions`` counts instructions per call under valgrind
(noise-free; use it while the machine is busy).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    compare,
    count_instructions,
    interleave,
    sync_timer,
    valgrind,
    version,
)

import gateway_guard as gg  # noqa: E402
from gateway_guard._instrument import instrumented  # noqa: E402

BODY = b'{"id": 42, "name": "widget"}'
UPSTREAM = "http://up.internal:8080"
OTHER = "http://other.example"
GOAL_OTHER_US = 0.5
GOAL_UPSTREAM_RATIO = 1.01

BARE_OTHER = "bare, other host"
INSTR_OTHER = "instrumented, other host"
EXPLICIT = "explicit guard.client()"
INSTR_UPSTREAM = "instrumented, upstream host"
NAMES = (BARE_OTHER, INSTR_OTHER, EXPLICIT, INSTR_UPSTREAM)
INSTRUMENTED = frozenset({INSTR_OTHER, INSTR_UPSTREAM})


@dataclass(frozen=True)
class Plan:
    number: int
    rounds: int
    warmup: int
    budget: float
    instruction_calls: tuple[int, int]


# Untimed calls after instrumentation is switched on or off (see run_timed).
SETTLE_CALLS = 200

FULL = Plan(number=100, rounds=121, warmup=500, budget=40.0, instruction_calls=(200, 1_200))
QUICK = Plan(number=50, rounds=31, warmup=100, budget=4.0, instruction_calls=(50, 250))


def handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=BODY, headers={"content-type": "application/json"})


def candidates(guard: gg.Guard) -> dict[str, Callable[[], httpx.Response]]:
    """One call per candidate (their clients live as long as the process)."""
    mock = httpx.MockTransport(handler)
    other = httpx.Client(base_url=OTHER, transport=mock)
    plain_up = httpx.Client(base_url=UPSTREAM, transport=httpx.MockTransport(handler))
    explicit = guard.client("up", transport=httpx.MockTransport(handler))
    return {
        BARE_OTHER: lambda: other.get("/items/42"),
        INSTR_OTHER: lambda: other.get("/items/42"),
        EXPLICIT: lambda: explicit.get("/items/42"),
        INSTR_UPSTREAM: lambda: plain_up.get("/items/42"),
    }


def make_guard() -> gg.Guard:
    return gg.Guard({"upstreams": {"up": {"base_url": UPSTREAM}}})


def _switch(guard: gg.Guard, on: bool) -> bool:
    """Instrument httpx for ``guard``, or not; True when that changed anything."""
    if (instrumented()[0] is guard) == on:
        return False
    if on:
        gg.instrument(guard, clients=("httpx",))
    else:
        gg.uninstrument()
    return True


def _check(guard: gg.Guard, calls: dict[str, Callable[[], httpx.Response]]) -> None:
    # Every row must make the call it claims: the upstream rows through the guard.
    for name, call in calls.items():
        _switch(guard, name in INSTRUMENTED)
        response = call()
        if response.status_code != 200 or response.read() != BODY:
            raise RuntimeError(f"{name}: unexpected response {response!r}")
    breaker = guard.breaker("up")
    if breaker.snapshot().calls != 2:  # explicit + instrumented upstream
        raise RuntimeError("the upstream calls did not all go through the guard")
    gg.uninstrument()


def run_timed(plan: Plan) -> list[dict[str, Any]]:
    guard = make_guard()
    calls = candidates(guard)
    _check(guard, calls)

    def timer(name: str) -> Callable[[int], float]:
        inner = sync_timer(calls[name])
        on = name in INSTRUMENTED

        call = calls[name]

        def timed(number: int) -> float:
            if _switch(guard, on):
                # Patching httpx.Client's method changes the class, and CPython 3.11 drops
                # what it specialised for it: the calls after a switch are slower for a
                # while, in every row alike. A process does not toggle instrumentation
                # every hundred calls, so they run untimed.
                for _ in range(SETTLE_CALLS):
                    call()
            return inner(number)

        return timed

    rounds = interleave(
        {name: timer(name) for name in NAMES},
        number=plan.number,
        rounds=plan.rounds,
        warmup=plan.warmup,
        budget=plan.budget,
    )
    gg.uninstrument()
    other = compare({k: rounds.samples[k] for k in (BARE_OTHER, INSTR_OTHER)}, BARE_OTHER)
    upstream = compare({k: rounds.samples[k] for k in (EXPLICIT, INSTR_UPSTREAM)}, EXPLICIT)
    rows = []
    for baseline, stats in ((BARE_OTHER, other), (EXPLICIT, upstream)):
        for name, s in stats.items():
            goal_other = name == INSTR_OTHER
            goal_up = name == INSTR_UPSTREAM
            rows.append(
                {
                    "bench": "instrument",
                    "level": "client",
                    "candidate": name,
                    "baseline": baseline,
                    "version": version("httpx"),
                    "us_per_call": s.median_us,
                    "ratio": s.ratio_median,
                    "ratio_ci": s.ratio_ci,
                    "added_us": s.added_us,
                    "added_ci": s.added_ci,
                    "goal": (
                        f"≤ {GOAL_OTHER_US:g} µs added"
                        if goal_other
                        else f"≤ {GOAL_UPSTREAM_RATIO}x"
                        if goal_up
                        else None
                    ),
                    "goal_met": (
                        s.added_us <= GOAL_OTHER_US
                        if goal_other
                        else s.ratio_median <= GOAL_UPSTREAM_RATIO
                        if goal_up
                        else None
                    ),
                    "rounds": rounds.rounds,
                    "number": rounds.number,
                    "stopped_early": rounds.stopped_early,
                }
            )
    return rows


# --- instruction counts ---------------------------------------------------------------------


def child(name: str, calls: int) -> None:
    """Make ``calls`` calls of one candidate and nothing else (run under valgrind)."""
    guard = make_guard()
    call = candidates(guard)[name]
    _switch(guard, name in INSTRUMENTED)
    for _ in range(calls):
        call()


def _instructions(name: str, calls: int) -> int:
    argv = [sys.executable, os.path.abspath(__file__), "--child", name, str(calls)]
    return count_instructions(argv)


def run_instructions(plan: Plan) -> list[dict[str, Any]]:
    """Instructions per call, (count(n2) - count(n1)) / (n2 - n1), so start-up cancels."""
    n1, n2 = plan.instruction_calls
    jobs = [(name, n) for name in NAMES for n in (n1, n2)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _instructions(*job), jobs), strict=True))
    per_call = {name: (counts[name, n2] - counts[name, n1]) / (n2 - n1) for name in NAMES}
    rows = []
    for name, baseline in (
        (BARE_OTHER, BARE_OTHER),
        (INSTR_OTHER, BARE_OTHER),
        (EXPLICIT, EXPLICIT),
        (INSTR_UPSTREAM, EXPLICIT),
    ):
        rows.append(
            {
                "bench": "instrument",
                "level": "instructions",
                "candidate": name,
                "baseline": baseline,
                "instructions_per_call": per_call[name],
                "ratio": per_call[name] / per_call[baseline],
                "added_instructions": per_call[name] - per_call[baseline],
                "calls": (n1, n2),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["level"] == "client":
            verdict = ""
            if r.get("goal"):
                verdict = f"  goal {r['goal']}: {'met' if r['goal_met'] else 'NOT met'}"
            lines.append(
                f"{r['candidate']:30} {r['us_per_call']:8.2f} µs  {r['ratio']:.4f}x "
                f"{r['added_us']:+7.3f} µs vs {r['baseline']}{verdict}"
            )
        else:
            lines.append(
                f"{r['candidate']:30} {r['instructions_per_call']:10.0f} instr/call  "
                f"{r['ratio']:.4f}x {r['added_instructions']:+8.0f} vs {r['baseline']}"
            )
    return "\n".join(lines)


def main(
    quick: bool = False, *, instructions: bool = False, quiet: bool = False
) -> list[dict[str, Any]]:
    plan = QUICK if quick else FULL
    rows = run_timed(plan)
    if instructions:
        if valgrind() is None:
            if not quiet:
                print("--instructions: valgrind is not installed; skipped")
        else:
            rows += run_instructions(plan)
    if not quiet:
        print(format_rows(rows))
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    parser.add_argument("--instructions", action="store_true", help="also count instructions")
    parser.add_argument("--instructions-only", action="store_true", help="only count them")
    parser.add_argument("--child", nargs=2, metavar=("CANDIDATE", "CALLS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(None)
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.instructions_only:
        print(format_rows(run_instructions(QUICK if args.quick else FULL)))
    else:
        main(args.quick, instructions=args.instructions)
