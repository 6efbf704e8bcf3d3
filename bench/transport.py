"""Per-call cost of a guarded httpx call (breaker + retry + bulkhead + deadline, all on)
against bare httpx and the usual resilience libraries, sync and async.

    .venv/bin/python bench/transport.py [--quick] [--markdown] [--profile] [--instructions]

Goal (issue): gateway_guard with its defaults costs at most 1.03x bare httpx per call.

Every candidate makes the same call: ``GET /items/42`` answered 200 with a small JSON body
by one handler function through ``httpx.MockTransport``, so no network is involved and the
rows differ only by what wraps the client. Each candidate has its own client, built once.

Client calls (``client.get(path)``; the goal is judged here):

- bare httpx: ``httpx.Client`` / ``AsyncClient`` over the mock transport (the baseline).
- gateway_guard: ``Guard({"upstreams": {"up": {"base_url": ...}}}).client("up",
  transport=mock)``; the defaults have the breaker on, 3 attempts, a bulkhead of 100.
  No inbound request is being served, so no request context is set.
- gateway_guard (in request): the same guard with a request context set, as the
  middlewares do in a web app: adds request-id / traceparent propagation and the per-call
  diagnostics record. Informational: the goal is judged on the row above.
- httpx-retries: ``RetryTransport(transport=mock)`` with its default ``Retry``.
- tenacity: ``@retry(stop=stop_after_attempt(3),
  wait=wait_exponential_jitter(multiplier=0.1, max=2.0))`` around ``client.get``.
- stamina: ``@stamina.retry(on=httpx.HTTPError, attempts=3)`` around ``client.get``.
- pybreaker: ``CircuitBreaker().call(client.get, url)``, sync only: its ``call_async``
  is built on Tornado coroutines, and there is no asyncio path.

Transport layer only (``transport.handle_request(request)`` on one prebuilt request): the
mock transport alone, wrapped by gateway_guard, wrapped by httpx-retries. Without the
~90 µs of httpx's client machinery around it, the added µs per call is far less noisy, but
it is a floor: in this tight loop the guard's code and objects stay hot in the caches,
inside a full client call they do not, and the client rows show what that costs.
``--instructions`` (valgrind) adds a third, noise-free view: instructions per client call.

Method: see ``bench/_common.py``. Candidates are timed in interleaved rounds, each against
the baseline timed in the same round; the tables give the median of those per-round
ratios with a distribution-free 95% interval, their minimum, and the median per-round
difference in µs (a ratio hides how expensive the baseline is). Time is this process's
CPU time (``--clock wall`` for wall time). The default run takes well under 90 s,
``--quick`` about 5 s; ``--profile`` adds ~10 s, ``--instructions`` a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import cProfile
import io
import os
import pstats
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx

# As a script (`python bench/transport.py`) bench/ is on sys.path; imported as
# `bench.transport` (run_all, tests) the package path is.
try:
    from bench._common import (
        Rounds,
        async_timer,
        compare,
        count_instructions,
        interleave,
        machine_note,
        markdown_table,
        sync_timer,
        text_table,
        valgrind,
        version,
    )
except ImportError:
    from _common import (  # type: ignore[import-not-found,no-redef]
        Rounds,
        async_timer,
        compare,
        count_instructions,
        interleave,
        machine_note,
        markdown_table,
        sync_timer,
        text_table,
        valgrind,
        version,
    )

GOAL_RATIO = 1.03
BASE_URL = "http://up.test"
PATH = "/items/42"
BODY = b'{"id": 42, "name": "widget", "price": "9.99"}'
SETTINGS = {"upstreams": {"up": {"base_url": BASE_URL}}}

BASELINE = "bare httpx"
TRANSPORT_BASELINE = "MockTransport alone"
GUARD = "gateway_guard"
GUARD_IN_REQUEST = "gateway_guard (in request)"


@dataclass(frozen=True)
class Plan:
    """Fixed counts: ``rounds`` of ``number`` calls per candidate, for each mode and level.

    ``budget`` is the wall time (s) per mode after which no new round starts; the full
    plan's budgets add up to under 90 s however loaded the machine is.
    """

    number: int
    rounds: int
    warmup: int
    budget: float
    transport_number: int
    transport_rounds: int
    transport_budget: float
    profile_calls: int
    # --instructions: each candidate runs under valgrind for these two call counts.
    instruction_calls: tuple[int, int]


FULL = Plan(
    number=100,
    rounds=161,
    warmup=500,
    budget=33.0,
    transport_number=500,
    transport_rounds=61,
    transport_budget=5.0,
    profile_calls=20_000,
    instruction_calls=(200, 1_200),
)
QUICK = Plan(
    number=50,
    rounds=41,
    warmup=100,
    budget=3.0,
    transport_number=200,
    transport_rounds=21,
    transport_budget=1.0,
    profile_calls=2_000,
    instruction_calls=(50, 250),
)


def handler(request: httpx.Request) -> httpx.Response:
    """The one upstream every candidate calls."""
    return httpx.Response(200, content=BODY, headers={"content-type": "application/json"})


def _mock() -> httpx.MockTransport:
    return httpx.MockTransport(handler)


@dataclass
class Candidate:
    name: str
    distribution: str
    call: Callable[[], Any]
    context: contextvars.Context | None = None


def _request_context(guard: Any) -> contextvars.Context:
    """A context in which a gateway_guard middleware is serving an inbound request."""
    from gateway_guard.context import RequestContext, set_context

    ctx = contextvars.copy_context()
    # As start() makes it: calls are recorded only for debug mode's Server-Timing.
    request = RequestContext(
        guard=guard, request_id="bench-request-0001", records=guard.settings.debug
    )
    ctx.run(set_context, request)
    return ctx


def _tenacity_retry() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    import tenacity

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=2.0),
        reraise=True,
    )


def _stamina_retry() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    import stamina

    return stamina.retry(on=httpx.HTTPError, attempts=3)


# --- candidates -----------------------------------------------------------------------------


def sync_candidates(stack: ExitStack) -> list[Candidate]:
    """The sync clients, closed by ``stack``; the first is the baseline."""
    import pybreaker
    from httpx_retries import RetryTransport

    from gateway_guard import Guard

    def client(**kwargs: Any) -> httpx.Client:
        kwargs.setdefault("transport", _mock())
        return stack.enter_context(httpx.Client(base_url=BASE_URL, **kwargs))

    guard = Guard(SETTINGS)
    guarded = stack.enter_context(guard.client("up", transport=_mock()))
    in_request = stack.enter_context(guard.client("up", transport=_mock()))
    retrying = client(transport=RetryTransport(transport=_mock()))
    breaker = pybreaker.CircuitBreaker()
    return [
        Candidate(BASELINE, "httpx", partial(client().get, PATH)),
        Candidate(GUARD, "gateway-guard", partial(guarded.get, PATH)),
        Candidate(
            GUARD_IN_REQUEST,
            "gateway-guard",
            partial(in_request.get, PATH),
            _request_context(guard),
        ),
        Candidate("httpx-retries", "httpx-retries", partial(retrying.get, PATH)),
        Candidate("tenacity", "tenacity", partial(_tenacity_retry()(client().get), PATH)),
        Candidate("stamina", "stamina", partial(_stamina_retry()(client().get), PATH)),
        Candidate("pybreaker", "pybreaker", partial(breaker.call, client().get, PATH)),
    ]


def async_candidates(clients: list[httpx.AsyncClient]) -> list[Candidate]:
    """The async clients (appended to ``clients`` for closing); the first is the baseline."""
    from httpx_retries import RetryTransport

    from gateway_guard import Guard

    def client(**kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("transport", _mock())
        clients.append(httpx.AsyncClient(base_url=BASE_URL, **kwargs))
        return clients[-1]

    guard = Guard(SETTINGS)
    guarded = guard.async_client("up", transport=_mock())
    in_request = guard.async_client("up", transport=_mock())
    clients += [guarded, in_request]
    retrying = client(transport=RetryTransport(transport=_mock()))
    return [
        Candidate(BASELINE, "httpx", partial(client().get, PATH)),
        Candidate(GUARD, "gateway-guard", partial(guarded.get, PATH)),
        Candidate(
            GUARD_IN_REQUEST,
            "gateway-guard",
            partial(in_request.get, PATH),
            _request_context(guard),
        ),
        Candidate("httpx-retries", "httpx-retries", partial(retrying.get, PATH)),
        Candidate("tenacity", "tenacity", partial(_tenacity_retry()(client().get), PATH)),
        Candidate("stamina", "stamina", partial(_stamina_retry()(client().get), PATH)),
    ]


def transport_candidates(mode: str) -> list[Candidate]:
    """``handle_request`` / ``handle_async_request`` of each transport on one request.

    The request is reused: its body is empty and read once, and the guard only rewrites
    its timeout extension, so every call after the first does the same work.
    """
    from httpx_retries import RetryTransport

    from gateway_guard import Guard

    guard = Guard(SETTINGS)
    request = httpx.Request("GET", BASE_URL + PATH)
    calls: list[Callable[[], Any]]
    if mode == "sync":
        transports: list[httpx.BaseTransport] = [
            _mock(),
            guard.transport("up", _mock()),
            RetryTransport(transport=_mock()),
        ]
        calls = [partial(t.handle_request, request) for t in transports]
    else:
        async_transports: list[httpx.AsyncBaseTransport] = [
            _mock(),
            guard.async_transport("up", _mock()),
            RetryTransport(transport=_mock()),
        ]
        calls = [partial(t.handle_async_request, request) for t in async_transports]
    names = [
        (TRANSPORT_BASELINE, "httpx"),
        (GUARD, "gateway-guard"),
        ("httpx-retries", "httpx-retries"),
    ]
    return [Candidate(n, d, c) for (n, d), c in zip(names, calls, strict=True)]


# --- running --------------------------------------------------------------------------------


def _check(candidates: list[Candidate], send: Callable[[Candidate], Any]) -> None:
    # Every row must really make the call it claims; a wrapper that swallowed it would win.
    for candidate in candidates:
        response = send(candidate)
        if response.status_code != 200 or response.read() != BODY:
            raise RuntimeError(f"{candidate.name}: unexpected response {response!r}")


def _run_sync(candidates: list[Candidate], plan: Plan, level: str, clock: str) -> Rounds:
    _check(candidates, lambda c: c.context.run(c.call) if c.context else c.call())
    timers = {c.name: sync_timer(c.call, context=c.context, clock=clock) for c in candidates}
    return _interleave(timers, plan, level)


def _run_async(
    candidates: list[Candidate], plan: Plan, level: str, clock: str, runner: asyncio.Runner
) -> Rounds:
    _check(candidates, lambda c: runner.run(c.call(), context=c.context))
    timers = {
        c.name: async_timer(c.call, runner, context=c.context, clock=clock) for c in candidates
    }
    return _interleave(timers, plan, level)


def _interleave(timers: dict[str, Callable[[int], float]], plan: Plan, level: str) -> Rounds:
    if level == "client":
        number, rounds, budget = plan.number, plan.rounds, plan.budget
    else:
        number, rounds = plan.transport_number, plan.transport_rounds
        budget = plan.transport_budget
    return interleave(timers, number=number, rounds=rounds, warmup=plan.warmup, budget=budget)


def _rows(
    level: str, mode: str, candidates: list[Candidate], rounds: Rounds, clock: str
) -> list[dict[str, Any]]:
    baseline = candidates[0].name
    stats = compare(rounds.samples, baseline)
    rows = []
    for candidate in candidates:
        s = stats[candidate.name]
        is_goal = level == "client" and candidate.name == GUARD
        rows.append(
            {
                "bench": "transport",
                "level": level,
                "mode": mode,
                "candidate": candidate.name,
                "baseline": baseline,
                "version": version(candidate.distribution),
                "us_per_call": s.median_us,
                "min_us_per_call": s.min_us,
                "ratio": s.ratio_median,
                "min_ratio": s.ratio_min,
                "max_ratio": s.ratio_max,
                "ratio_ci": s.ratio_ci,
                "added_us": s.added_us,
                "added_ci": s.added_ci,
                "goal_ratio": GOAL_RATIO if is_goal else None,
                "goal_met": (s.ratio_median <= GOAL_RATIO) if is_goal else None,
                "rounds": rounds.rounds,
                "number": rounds.number,
                "stopped_early": rounds.stopped_early,
                "clock": clock,
                "seconds": rounds.elapsed,
            }
        )
    return rows


def _implied(rows: list[dict[str, Any]]) -> None:
    """Add to each client-level goal row the ratio the transport-level floor would give."""
    for row in rows:
        if row["level"] != "client" or row["goal_ratio"] is None:
            continue
        bare = next(
            r
            for r in rows
            if (r["level"], r["mode"], r["candidate"]) == ("client", row["mode"], BASELINE)
        )
        layer = next(
            r
            for r in rows
            if (r["level"], r["mode"], r["candidate"]) == ("transport", row["mode"], GUARD)
        )
        row["transport_added_us"] = layer["added_us"]
        row["floor_ratio"] = 1 + layer["added_us"] / bare["us_per_call"]


# --- output ---------------------------------------------------------------------------------

HEADERS = (
    "mode",
    "candidate",
    "version",
    "µs/call",
    "ratio (median)",
    "95% CI",
    "min ratio",
    "+µs/call",
    "goal",
)


def _interval(bounds: tuple[float, float], unit: str = "") -> str:
    low, high = bounds
    if unit == "x":
        return f"{low:.3f}-{high:.3f}x"
    return f"{low:+.2f} to {high:+.2f}{unit}"


def _significance(row: dict[str, Any]) -> str:
    low, high = row["ratio_ci"]
    goal = row["goal_ratio"]
    if low > goal:
        return "the whole 95% interval is above the goal"
    if high <= goal:
        return "the whole 95% interval is within the goal"
    return "the 95% interval straddles the goal: within noise"


def _goal_cell(row: dict[str, Any]) -> str:
    if row["goal_met"] is None:
        return ""
    return f"≤ {row['goal_ratio']}x: " + ("met" if row["goal_met"] else "NOT met")


def format_table(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """One table per level (client calls, transport layer only), with how they were run."""
    out: list[str] = []
    for level, title in (("client", "client calls"), ("transport", "transport layer only")):
        level_rows = [row for row in rows if row["level"] == level]
        if not level_rows:
            continue
        cells = [
            (
                row["mode"],
                row["candidate"],
                row["version"],
                f"{row['us_per_call']:.2f}",
                f"{row['ratio']:.3f}x",
                "" if row["candidate"] == row["baseline"] else _interval(row["ratio_ci"], "x"),
                f"{row['min_ratio']:.3f}x",
                "—" if row["candidate"] == row["baseline"] else f"{row['added_us']:+.2f}",
                _goal_cell(row),
            )
            for row in level_rows
        ]
        runs = "; ".join(
            f"{mode}: {r['rounds']} rounds x {r['number']} calls in {r['seconds']:.1f} s"
            + (" (stopped early: time budget)" if r["stopped_early"] else "")
            for mode, r in {row["mode"]: row for row in level_rows}.items()
        )
        heading = f"### {title}" if markdown else f"== {title} =="
        render = markdown_table if markdown else text_table
        out += [heading, "", render(HEADERS, cells, align="<<<>>>>><"), "", runs, ""]
    first = rows[0]
    notes = [
        f"µs/call: median over rounds ({first['clock']} clock). ratio: median of per-round "
        "ratios to the level's baseline timed in the same round. +µs/call: median per-round "
        "difference to it.",
        machine_note(),
    ]
    if markdown:
        notes = [f"{line}  " for line in notes]
    return "\n".join(out + notes)


def verdicts(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        if row["goal_met"] is None:
            continue
        verdict = "met" if row["goal_met"] else "NOT met"
        if row["level"] == "instructions":
            lines.append(
                f"goal ({row['mode']}, instructions): {row['ratio']:.4f}x "
                f"({row['added_instructions']:+,.0f} instructions/call): {verdict}"
            )
            continue
        line = (
            f"goal ({row['mode']}): gateway_guard ≤ {row['goal_ratio']}x bare httpx: "
            f"{row['ratio']:.3f}x ({_interval(row['ratio_ci'], 'x')}; "
            f"{row['added_us']:+.2f} µs/call, {_interval(row['added_ci'], ' µs')}): "
            f"{verdict}, {_significance(row)}"
        )
        if "floor_ratio" in row:
            line += (
                f"; the transport layer alone, hot, adds {row['transport_added_us']:+.2f} "
                f"µs/call ({row['floor_ratio']:.3f}x if that were all)"
            )
        lines.append(line)
    return "\n".join(lines)


def profile(calls: int = FULL.profile_calls, top: int = 25) -> str:
    """cProfile of ``calls`` guarded sync client calls: the top functions by own time,
    then every gateway_guard function. Profiling inflates small functions the most, so
    read it for where the time goes, and the tables for how much there is."""
    from gateway_guard import Guard

    guard = Guard(SETTINGS)
    with guard.client("up", transport=_mock()) as client:
        get = partial(client.get, PATH)
        for _ in range(500):
            get()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            get()
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(pstats.SortKey.TIME)
    out.write(f"--- top {top} by tottime, {calls} guarded sync calls ---\n")
    stats.print_stats(top)
    out.write("--- gateway_guard functions only ---\n")
    stats.print_stats("gateway_guard")
    return out.getvalue()


# --- instruction counts (--instructions) --------------------------------------------------

# The candidates the goal is about, and the closest competitor; the others are far off.
INSTRUCTION_CANDIDATES = (BASELINE, GUARD, GUARD_IN_REQUEST, "httpx-retries")


def child(mode: str, name: str, calls: int) -> None:
    """Make ``calls`` client calls of one candidate and nothing else (run under valgrind)."""
    if mode == "sync":
        with ExitStack() as stack:
            candidate = next(c for c in sync_candidates(stack) if c.name == name)
            run = candidate.context.run if candidate.context else _call
            for _ in range(calls):
                run(candidate.call)
        return
    clients: list[httpx.AsyncClient] = []
    with asyncio.Runner() as runner:
        candidate = next(c for c in async_candidates(clients) if c.name == name)

        async def many() -> None:
            call = candidate.call
            for _ in range(calls):
                await call()

        runner.run(many(), context=candidate.context)
        for client in clients:
            runner.run(client.aclose())


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def _instructions(mode: str, name: str, calls: int) -> int:
    argv = [sys.executable, os.path.abspath(__file__), "--child", mode, name, str(calls)]
    return count_instructions(argv)


def run_instructions(plan: Plan) -> list[dict[str, Any]]:
    """Instructions per client call: (count(n2) - count(n1)) / (n2 - n1) for each candidate,
    so interpreter start-up and imports cancel out. The runs go in parallel, one per CPU:
    counts do not depend on load."""
    n1, n2 = plan.instruction_calls
    jobs = [
        (mode, name, n)
        for mode in ("sync", "async")
        for name in INSTRUCTION_CANDIDATES
        for n in (n1, n2)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _instructions(*job), jobs), strict=True))
    rows = []
    for mode in ("sync", "async"):
        per_call = {
            name: (counts[mode, name, n2] - counts[mode, name, n1]) / (n2 - n1)
            for name in INSTRUCTION_CANDIDATES
        }
        bare = per_call[BASELINE]
        for name, value in per_call.items():
            is_goal = name == GUARD
            rows.append(
                {
                    "bench": "transport",
                    "level": "instructions",
                    "mode": mode,
                    "candidate": name,
                    "baseline": BASELINE,
                    "version": version("httpx" if name == BASELINE else _distribution(name)),
                    "instructions_per_call": value,
                    "ratio": value / bare,
                    "added_instructions": value - bare,
                    "goal_ratio": GOAL_RATIO if is_goal else None,
                    "goal_met": (value / bare <= GOAL_RATIO) if is_goal else None,
                    "calls": (n1, n2),
                }
            )
    return rows


def _distribution(name: str) -> str:
    return "gateway-guard" if name.startswith("gateway_guard") else name


INSTRUCTION_HEADERS = ("mode", "candidate", "version", "instr/call", "ratio", "+instr/call", "goal")


def format_instructions(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    cells = [
        (
            row["mode"],
            row["candidate"],
            row["version"],
            f"{row['instructions_per_call']:,.0f}",
            f"{row['ratio']:.4f}x",
            "—" if row["candidate"] == BASELINE else f"{row['added_instructions']:+,.0f}",
            _goal_cell(row),
        )
        for row in rows
    ]
    n1, n2 = rows[0]["calls"]
    render = markdown_table if markdown else text_table
    heading = (
        "### instructions per client call" if markdown else "== instructions per client call =="
    )
    note = (
        f"valgrind cachegrind, (count at {n2} calls - count at {n1}) / {n2 - n1}; "
        "deterministic, but instructions are not time (cache misses and branches are not "
        "counted), so read it beside the timed tables."
    )
    return "\n".join([heading, "", render(INSTRUCTION_HEADERS, cells, align="<<<>>><"), "", note])


# --- entry points ---------------------------------------------------------------------------


def main(
    quick: bool = False,
    *,
    markdown: bool = False,
    with_profile: bool = False,
    clock: str = "cpu",
    instructions: bool = False,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Run every level and mode, print the tables (unless ``quiet``), return one dict per row.

    The goal rows (candidate ``gateway_guard`` at level ``client``, and at level
    ``instructions`` when asked for) carry ``goal_met``.
    """
    plan = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        candidates = sync_candidates(stack)
        rows += _rows(
            "client", "sync", candidates, _run_sync(candidates, plan, "client", clock), clock
        )
    clients: list[httpx.AsyncClient] = []
    with asyncio.Runner() as runner:
        try:
            candidates = async_candidates(clients)
            rounds = _run_async(candidates, plan, "client", clock, runner)
            rows += _rows("client", "async", candidates, rounds, clock)
        finally:
            for client in clients:
                runner.run(client.aclose())
        candidates = transport_candidates("async")
        rounds = _run_async(candidates, plan, "transport", clock, runner)
        async_layer = _rows("transport", "async", candidates, rounds, clock)
    candidates = transport_candidates("sync")
    rounds = _run_sync(candidates, plan, "transport", clock)
    rows += _rows("transport", "sync", candidates, rounds, clock) + async_layer
    _implied(rows)
    if not quiet:
        print(format_table(rows, markdown=markdown))
    if instructions:
        if valgrind() is None:
            print("\n--instructions: valgrind is not installed; skipped")
        else:
            counted = run_instructions(plan)
            rows += counted
            if not quiet:
                print()
                print(format_instructions(counted, markdown=markdown))
    if not quiet:
        print()
        print(verdicts(rows))
    if with_profile:
        report = profile(plan.profile_calls)
        if not quiet:
            print()
            print(report)
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile 20k guarded sync calls"
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this process's CPU time (default; leaves out other processes); wall",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per call under valgrind (about 1-2 minutes)",
    )
    # Internal: what --instructions runs under valgrind.
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "CANDIDATE", "CALLS"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(None)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
    else:
        main(
            args.quick,
            markdown=args.markdown,
            with_profile=args.profile,
            clock=args.clock,
            instructions=args.instructions,
        )
